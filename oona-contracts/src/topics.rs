//! Every topic of the platform, with its plane, publishers and consumers.

use std::fmt;
use std::str::FromStr;

use oona_core::{Error, ErrorKind, PolicySet, Result, Retention, Topic};

use crate::message::ContractInfo;

/// The plane of a topic: its first segment, which decides retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Plane {
    /// `compilation.*`: the asset pipeline.
    Compilation,
    /// `telemetry.*`: high-frequency health data (72 hours).
    Telemetry,
    /// `control.*`: commands (30 days).
    Control,
    /// `innovation.*`: the experience data set (indefinite).
    Innovation,
    /// `system.*`: training-loop events (30 days).
    System,
    /// `oona.*`: the bus's own streams (kernel prefetch, node introspection).
    Oona,
}

impl Plane {
    /// The plane's name, the first segment of its topics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Plane::Compilation => "compilation",
            Plane::Telemetry => "telemetry",
            Plane::Control => "control",
            Plane::Innovation => "innovation",
            Plane::System => "system",
            Plane::Oona => "oona",
        }
    }

    /// The plane's retention under the platform's default policy table
    /// ([`PolicySet::default`]).
    pub fn retention(self) -> Retention {
        // Any topic of the plane gives the plane's policy.
        let probe = match self {
            Plane::Compilation => TopicName::CompilationBlueprintSubmitted,
            Plane::Telemetry => TopicName::TelemetrySeedHealth,
            Plane::Control => TopicName::ControlKasminaCommands,
            Plane::Innovation => TopicName::InnovationFieldReports,
            Plane::System => TopicName::SystemEventsEpoch,
            Plane::Oona => TopicName::OonaKernelsRequests,
        };
        PolicySet::default().for_topic(&probe.topic()).retention
    }
}

impl fmt::Display for Plane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! topics {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, $plane:ident, [$($p:literal),*], [$($c:literal),*]; )*) => {
        /// Every topic of the platform: SPEC.md's topic table, Tezzeret's
        /// `compilation.blueprint.compiled`, the kernel streams and node
        /// introspection. Each is bound to one payload type through
        /// [`crate::Message::TOPIC`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum TopicName {
            $( $(#[$doc])* $variant, )*
        }

        impl TopicName {
            /// All topics, in table order.
            pub const ALL: &'static [TopicName] = &[$(TopicName::$variant),*];

            /// The topic name.
            pub const fn as_str(self) -> &'static str {
                match self { $(TopicName::$variant => $name,)* }
            }

            /// The plane of the topic.
            pub const fn plane(self) -> Plane {
                match self { $(TopicName::$variant => Plane::$plane,)* }
            }

            /// The services that publish to it.
            pub const fn publishers(self) -> &'static [&'static str] {
                match self { $(TopicName::$variant => &[$($p),*],)* }
            }

            /// The services that consume it.
            pub const fn consumers(self) -> &'static [&'static str] {
                match self { $(TopicName::$variant => &[$($c),*],)* }
            }
        }
    };
}

topics! {
    /// `compilation.blueprint.submitted`: BlueprintSubmitted.
    CompilationBlueprintSubmitted = "compilation.blueprint.submitted", Compilation, ["urza"], ["tezzeret"];
    /// `compilation.blueprint.compiled`: BlueprintCompiled.
    CompilationBlueprintCompiled = "compilation.blueprint.compiled", Compilation, ["tezzeret"], ["urza"];
    /// `telemetry.seed.health`: LayerHealthReport (of HealthSignals).
    TelemetrySeedHealth = "telemetry.seed.health", Telemetry, ["kasmina"], ["tamiyo", "nissa"];
    /// `control.kasmina.commands`: KasminaControlCommand.
    ControlKasminaCommands = "control.kasmina.commands", Control, ["tamiyo"], ["kasmina"];
    /// `innovation.field_reports`: FieldReport.
    InnovationFieldReports = "innovation.field_reports", Innovation, ["tamiyo"], ["karn", "simic"];
    /// `innovation.candidates.submitted`: CandidateBlueprint.
    InnovationCandidatesSubmitted = "innovation.candidates.submitted", Innovation, ["karn"], ["urabrask"];
    /// `innovation.certification.results`: CertifiedBlueprint.
    InnovationCertificationResults = "innovation.certification.results", Innovation, ["urabrask"], ["urza", "karn"];
    /// `system.events.epoch`: EpochEvent.
    SystemEventsEpoch = "system.events.epoch", System, ["tolaria"], ["tamiyo", "nissa"];
    /// `system.events.rollback`: RollbackEvent.
    SystemEventsRollback = "system.events.rollback", System, ["tolaria"], ["tamiyo", "nissa"];
    /// `oona.kernels.requests`: KernelRequest.
    OonaKernelsRequests = "oona.kernels.requests", Oona, ["kasmina"], ["urza"];
    /// `oona.kernels.ready`: KernelReady.
    OonaKernelsReady = "oona.kernels.ready", Oona, ["urza"], ["kasmina"];
    /// `oona.kernels.errors`: KernelError.
    OonaKernelsErrors = "oona.kernels.errors", Oona, ["urza"], ["kasmina"];
    /// `oona.nodes.introspection`: NodeIntrospectionEvent.
    OonaNodesIntrospection = "oona.nodes.introspection", Oona, ["every node"], ["service registry"];
}

impl TopicName {
    /// The validated [`Topic`].
    pub fn topic(self) -> Topic {
        // Every name above passes the grammar (checked by the
        // `every_topic_name_is_valid` test), so this cannot fail at run time.
        #[allow(clippy::expect_used)]
        Topic::new(self.as_str()).expect("TopicName constants are valid topic names")
    }

    /// The contract (payload schema) bound to the topic.
    pub fn contract(self) -> Option<&'static ContractInfo> {
        crate::contracts().iter().find(|c| c.topic == self)
    }

    /// The topic's retention under the default policy table.
    pub fn retention(self) -> Retention {
        self.plane().retention()
    }

    /// Look a topic name up.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.as_str() == name)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidTopic,
                    format!("{name:?} is not a platform topic (see oona_contracts::TopicName)"),
                )
            })
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TopicName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        TopicName::parse(s)
    }
}

impl TryFrom<&Topic> for TopicName {
    type Error = Error;
    fn try_from(t: &Topic) -> Result<Self> {
        TopicName::parse(t.as_str())
    }
}

impl From<TopicName> for Topic {
    fn from(t: TopicName) -> Topic {
        t.topic()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_topic_name_is_valid() {
        for t in TopicName::ALL {
            let topic = t.topic();
            assert_eq!(topic.as_str(), t.as_str());
            assert_eq!(topic.plane(), t.plane().as_str());
            assert_eq!(TopicName::try_from(&topic).unwrap(), *t);
            assert!(!t.publishers().is_empty() && !t.consumers().is_empty());
        }
        assert_eq!(TopicName::ALL.len(), 13);
        assert_eq!(
            TopicName::parse("nope.x").unwrap_err().kind(),
            ErrorKind::InvalidTopic
        );
    }

    #[test]
    fn retention_follows_the_plane() {
        let day = 86_400;
        assert_eq!(
            TopicName::TelemetrySeedHealth.retention(),
            Retention::For(Duration::from_secs(3 * day))
        );
        assert_eq!(
            TopicName::ControlKasminaCommands.retention(),
            Retention::For(Duration::from_secs(30 * day))
        );
        assert_eq!(
            TopicName::InnovationFieldReports.retention(),
            Retention::Indefinite
        );
        assert_eq!(
            TopicName::SystemEventsRollback.retention(),
            Retention::For(Duration::from_secs(30 * day))
        );
    }
}
