//! `oona topics list | describe | apply-retention` and `oona groups`.

use oona::{Bus, Depth, GroupInfo, Topic, TopicInfo};
use serde_json::{json, Value};

use crate::exit::{Context as _, Failure};
use crate::out::{retention_text, say, Out};

/// Topics: list them, describe one, apply the plane's retention.
#[derive(Debug, clap::Subcommand)]
pub enum Topics {
    /// The topics the broker holds (under the URL's prefix, tenant or
    /// namespace).
    #[command(after_help = "Examples:\n  oona topics list\n  oona topics list --long --json")]
    List {
        /// Describe each: partitions, messages, retention, groups.
        #[arg(long, short)]
        long: bool,
    },
    /// Partitions, messages retained, retention, and each group with its
    /// members, backlog and pending.
    #[command(after_help = "Example:\n  oona topics describe telemetry.seed.health")]
    Describe {
        /// The topic.
        topic: String,
    },
    /// Apply the retention of each topic's plane (telemetry 72 h, control
    /// and system 30 days, innovation forever: Oona's default policy table,
    /// not a service's own overrides) on the broker, and read it back.
    #[command(after_help = "\
Examples:
  oona topics apply-retention telemetry.seed.health
  oona topics apply-retention --all")]
    ApplyRetention {
        /// The topics.
        topics: Vec<String>,
        /// Every topic the broker holds.
        #[arg(long, conflicts_with = "topics")]
        all: bool,
    },
}

/// The groups of a topic: members, backlog (not handed out yet) and
/// pending (handed out, not settled).
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  oona groups compilation.blueprint.submitted --json")]
pub struct GroupsArgs {
    /// The topic.
    topic: String,
}

pub async fn run(bus: &Bus, out: &Out, t: Topics) -> Result<(), Failure> {
    match t {
        Topics::List { long } => list(bus, out, long).await,
        Topics::Describe { topic } => describe(bus, out, &topic).await,
        Topics::ApplyRetention { topics, all } => apply_retention(bus, out, topics, all).await,
    }
}

async fn list(bus: &Bus, out: &Out, long: bool) -> Result<(), Failure> {
    let t = bus.transport();
    let topics = t.list_topics().await.ctx("listing topics")?;
    if !long {
        for topic in &topics {
            match out.json {
                true => out.json_line(&json!({"topic": topic.as_str()})),
                false => say!("{topic}"),
            }
        }
        return Ok(());
    }
    let mut rows = Vec::new();
    for topic in &topics {
        let info = t
            .describe_topic(topic)
            .await
            .ctx(&format!("describing {topic}"))?;
        if out.json {
            out.json_line(&topic_json(&info));
        } else {
            rows.push(vec![
                topic.to_string(),
                info.partitions.to_string(),
                info.messages.map_or("?".into(), |n| n.to_string()),
                retention_text(info.retention),
                info.groups.len().to_string(),
            ]);
        }
    }
    if !out.json {
        out.table(
            &["TOPIC", "PARTITIONS", "MESSAGES", "RETENTION", "GROUPS"],
            &rows,
        );
    }
    Ok(())
}

fn depth_json(d: Option<Depth>) -> Value {
    match d {
        Some(d) => json!({"backlog": d.backlog, "pending": d.pending, "total": d.total()}),
        None => Value::Null,
    }
}

fn group_json(g: &GroupInfo) -> Value {
    let members: Vec<Value> = g
        .members
        .iter()
        .map(|m| json!({"name": m.name, "address": m.address, "pending": m.pending}))
        .collect();
    json!({"group": g.group.as_str(), "members": members, "depth": depth_json(g.depth)})
}

fn topic_json(i: &TopicInfo) -> Value {
    json!({
        "topic": i.topic.as_str(),
        "partitions": i.partitions,
        "messages": i.messages,
        "retention": i.retention.map(|r| retention_text(Some(r))),
        "retention_ms": i.retention.map(|r| r.as_millis_or_minus_one()),
        "groups": i.groups.iter().map(group_json).collect::<Vec<_>>(),
    })
}

async fn describe_one(bus: &Bus, topic: &str) -> Result<TopicInfo, Failure> {
    let topic = Topic::new(topic).ctx("topic")?;
    bus.transport()
        .describe_topic(&topic)
        .await
        .ctx(topic.as_str())
}

async fn describe(bus: &Bus, out: &Out, topic: &str) -> Result<(), Failure> {
    let info = describe_one(bus, topic).await?;
    if out.json {
        out.json_line(&topic_json(&info));
        return Ok(());
    }
    say!("{}", out.bold(info.topic.as_str()));
    say!("  partitions  {}", info.partitions);
    say!(
        "  messages    {}",
        info.messages
            .map_or("not counted by this broker".into(), |n| n.to_string())
    );
    say!("  retention   {}", retention_text(info.retention));
    say!();
    group_table(out, &info.groups);
    Ok(())
}

fn group_table(out: &Out, groups: &[GroupInfo]) {
    let count =
        |d: Option<Depth>, f: fn(&Depth) -> u64| d.map_or("?".into(), |d| f(&d).to_string());
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            let members: Vec<String> = g
                .members
                .iter()
                .map(|m| match m.pending {
                    Some(p) => format!("{} ({p})", m.name),
                    None => m.name.clone(),
                })
                .collect();
            vec![
                g.group.to_string(),
                count(g.depth, |d| d.backlog),
                count(g.depth, |d| d.pending),
                if members.is_empty() {
                    "-".into()
                } else {
                    members.join(", ")
                },
            ]
        })
        .collect();
    out.table(&["GROUP", "BACKLOG", "PENDING", "MEMBERS (PENDING)"], &rows);
}

pub async fn groups(bus: &Bus, out: &Out, a: GroupsArgs) -> Result<(), Failure> {
    let info = describe_one(bus, &a.topic).await?;
    if out.json {
        for g in &info.groups {
            out.json_line(&group_json(g));
        }
    } else {
        group_table(out, &info.groups);
    }
    Ok(())
}

async fn apply_retention(
    bus: &Bus,
    out: &Out,
    topics: Vec<String>,
    all: bool,
) -> Result<(), Failure> {
    let t = bus.transport();
    let topics: Vec<Topic> = match all {
        true => t.list_topics().await.ctx("listing topics")?,
        false if topics.is_empty() => {
            return Err(Failure::usage("name the topics, or pass --all"));
        }
        false => topics
            .iter()
            .map(|s| Topic::new(s).ctx("topic"))
            .collect::<Result<_, _>>()?,
    };
    let mut rows = Vec::new();
    for topic in &topics {
        let wanted = bus.policies().for_topic(topic).retention;
        // Applying never creates a topic (a typo would make one).
        t.describe_topic(topic).await.ctx(topic.as_str())?;
        bus.ensure_topic(topic.clone())
            .await
            .ctx(&format!("applying retention to {topic}"))?;
        let applied = match t.describe_topic(topic).await {
            Ok(i) => i.retention,
            Err(_) => None,
        };
        if out.json {
            out.json_line(&json!({"topic": topic.as_str(), "retention": retention_text(Some(wanted)), "applied": applied.map(|r| retention_text(Some(r)))}));
        } else {
            rows.push(vec![
                topic.to_string(),
                retention_text(Some(wanted)),
                retention_text(applied),
            ]);
        }
    }
    if !out.json {
        out.table(&["TOPIC", "RETENTION", "READ BACK"], &rows);
    }
    Ok(())
}
