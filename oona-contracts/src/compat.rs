//! Schema compatibility checks between two versions of a contract.
//!
//! - Protobuf ([`protobuf_message`], [`protobuf_pools`]): a check over
//!   descriptors. **Breaking:** a field's type or cardinality changed, a
//!   field removed without reserving its number, a new field on a reserved
//!   number or name, a field moved to another number, a new `required`
//!   field, an enum value renamed or renumbered (JSON and Avro carry enum
//!   names). **Warning:** a field renamed without listing the old name in
//!   `(oona.v1.former_names)` (binary-compatible, but JSON and Avro readers
//!   match by name), a removed field whose name is not reserved, a field's
//!   presence changed, an enum value removed.
//! - Avro ([`avro`], [`avro_full`]): apache-avro's schema compatibility
//!   (reader aliases included), in one or both directions.

use std::collections::HashSet;
use std::fmt;

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use prost_reflect::{
    Cardinality, DescriptorPool, EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor,
};

use crate::avro_schema::former_names;

/// How bad a change is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Readers of one version cannot (correctly) read the other.
    Breaking,
    /// Compatible on the binary wire, but worth a look.
    Warning,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// How bad it is.
    pub severity: Severity,
    /// Where: a message, field or enum value full name.
    pub path: String,
    /// What changed and why it matters.
    pub message: String,
}

/// The findings of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Every finding, in the order found.
    pub issues: Vec<Issue>,
}

impl Report {
    /// Whether no finding is breaking.
    pub fn is_compatible(&self) -> bool {
        !self.issues.iter().any(|i| i.severity == Severity::Breaking)
    }

    /// The breaking findings.
    pub fn breaking(&self) -> impl Iterator<Item = &Issue> {
        self.issues
            .iter()
            .filter(|i| i.severity == Severity::Breaking)
    }

    /// The warnings.
    pub fn warnings(&self) -> impl Iterator<Item = &Issue> {
        self.issues
            .iter()
            .filter(|i| i.severity == Severity::Warning)
    }

    fn push(&mut self, severity: Severity, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue {
            severity,
            path: path.into(),
            message: message.into(),
        });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.issues.is_empty() {
            return f.write_str("compatible, no findings");
        }
        for i in &self.issues {
            let s = match i.severity {
                Severity::Breaking => "breaking",
                Severity::Warning => "warning",
            };
            writeln!(f, "{s}: {}: {}", i.path, i.message)?;
        }
        Ok(())
    }
}

fn kind_name(k: &Kind) -> String {
    match k {
        Kind::Message(m) => format!("message {}", m.full_name()),
        Kind::Enum(e) => format!("enum {}", e.full_name()),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn shape(f: &FieldDescriptor) -> &'static str {
    if f.is_map() {
        "map"
    } else if f.is_list() {
        "repeated"
    } else {
        "singular"
    }
}

/// Compare two versions of every message and enum of `old` (in the given
/// packages, all when empty) that `new` still has; a message or enum that
/// `new` dropped is breaking.
pub fn protobuf_pools(old: &DescriptorPool, new: &DescriptorPool, packages: &[&str]) -> Report {
    let mut report = Report::default();
    let wanted = |p: &str| packages.is_empty() || packages.contains(&p);
    for m in old
        .all_messages()
        .filter(|m| wanted(m.package_name()) && !m.is_map_entry())
    {
        match new.get_message_by_name(m.full_name()) {
            Some(n) => check_message(&m, &n, &mut report),
            None => report.push(Severity::Breaking, m.full_name(), "message removed"),
        }
    }
    for e in old.all_enums().filter(|e| wanted(e.package_name())) {
        match new.get_enum_by_name(e.full_name()) {
            Some(n) => check_enum(&e, &n, &mut report),
            None => report.push(Severity::Breaking, e.full_name(), "enum removed"),
        }
    }
    report
}

/// Compare two versions of one message and every message and enum type it
/// uses.
pub fn protobuf_message(old: &MessageDescriptor, new: &MessageDescriptor) -> Report {
    let mut report = Report::default();
    let mut seen = HashSet::new();
    walk(old, new, &mut report, &mut seen);
    report
}

fn walk(
    old: &MessageDescriptor,
    new: &MessageDescriptor,
    report: &mut Report,
    seen: &mut HashSet<String>,
) {
    if !seen.insert(old.full_name().to_string()) {
        return;
    }
    check_message(old, new, report);
    for of in old.fields() {
        let Some(nf) = new.get_field(of.number()) else {
            continue;
        };
        match (of.kind(), nf.kind()) {
            (Kind::Message(a), Kind::Message(b)) if a.full_name() == b.full_name() => {
                walk(&a, &b, report, seen)
            }
            (Kind::Enum(a), Kind::Enum(b))
                if a.full_name() == b.full_name() && seen.insert(a.full_name().to_string()) =>
            {
                check_enum(&a, &b, report)
            }
            _ => {}
        }
    }
}

fn check_message(old: &MessageDescriptor, new: &MessageDescriptor, r: &mut Report) {
    for of in old.fields() {
        let path = of.full_name().to_string();
        match new.get_field(of.number()) {
            Some(nf) => {
                let (ok, nk) = (kind_name(&of.kind()), kind_name(&nf.kind()));
                if ok != nk {
                    r.push(
                        Severity::Breaking,
                        &path,
                        format!(
                            "field {} ({}) changed type from {ok} to {nk}",
                            of.name(),
                            of.number()
                        ),
                    );
                }
                if shape(&of) != shape(&nf) {
                    r.push(
                        Severity::Breaking,
                        &path,
                        format!(
                            "field {} ({}) changed from {} to {}",
                            of.name(),
                            of.number(),
                            shape(&of),
                            shape(&nf)
                        ),
                    );
                }
                if nf.cardinality() == Cardinality::Required
                    && of.cardinality() != Cardinality::Required
                {
                    r.push(
                        Severity::Breaking,
                        &path,
                        format!("field {} became required", of.name()),
                    );
                }
                if of.supports_presence() != nf.supports_presence()
                    && !of.is_list()
                    && !nf.is_list()
                {
                    r.push(
                        Severity::Warning,
                        &path,
                        format!(
                            "field {} changed presence (optional vs implicit)",
                            of.name()
                        ),
                    );
                }
                if of.name() != nf.name() && !former_names(&nf).iter().any(|n| n == of.name()) {
                    r.push(
                        Severity::Warning,
                        &path,
                        format!(
                            "field {} ({}) renamed to {}: binary-compatible, but JSON and Avro match by name; add (oona.v1.former_names) = \"{}\"",
                            of.name(),
                            of.number(),
                            nf.name(),
                            of.name()
                        ),
                    );
                }
            }
            None => {
                if let Some(moved) = new.get_field_by_name(of.name()) {
                    r.push(
                        Severity::Breaking,
                        &path,
                        format!(
                            "field {} moved from number {} to {}",
                            of.name(),
                            of.number(),
                            moved.number()
                        ),
                    );
                } else if !new.reserved_ranges().any(|rg| rg.contains(&of.number())) {
                    r.push(
                        Severity::Breaking,
                        &path,
                        format!(
                            "field {} ({}) removed without `reserved {}`: a later field could reuse the number with another type",
                            of.name(),
                            of.number(),
                            of.number()
                        ),
                    );
                } else if !new.reserved_names().any(|n| n == of.name()) {
                    r.push(
                        Severity::Warning,
                        &path,
                        format!(
                            "field {} removed; reserve its name too (`reserved \"{}\"`)",
                            of.name(),
                            of.name()
                        ),
                    );
                }
            }
        }
    }
    for nf in new.fields() {
        if old.get_field(nf.number()).is_some() {
            continue;
        }
        let path = nf.full_name().to_string();
        if old.reserved_ranges().any(|rg| rg.contains(&nf.number())) {
            r.push(
                Severity::Breaking,
                &path,
                format!(
                    "new field {} reuses reserved number {}",
                    nf.name(),
                    nf.number()
                ),
            );
        }
        if old.reserved_names().any(|n| n == nf.name()) {
            r.push(
                Severity::Breaking,
                &path,
                format!("new field {} reuses a reserved name", nf.name()),
            );
        }
        if nf.cardinality() == Cardinality::Required {
            r.push(
                Severity::Breaking,
                &path,
                format!(
                    "new field {} is required: old writers never set it",
                    nf.name()
                ),
            );
        }
    }
}

fn check_enum(old: &EnumDescriptor, new: &EnumDescriptor, r: &mut Report) {
    for ov in old.values() {
        let path = ov.full_name().to_string();
        match (new.get_value(ov.number()), new.get_value_by_name(ov.name())) {
            (Some(nv), _) if nv.name() == ov.name() => {}
            (Some(nv), _) => r.push(
                Severity::Breaking,
                &path,
                format!(
                    "enum value {} ({}) renamed to {}: JSON and Avro carry names",
                    ov.name(),
                    ov.number(),
                    nv.name()
                ),
            ),
            (None, Some(nv)) => r.push(
                Severity::Breaking,
                &path,
                format!(
                    "enum value {} renumbered from {} to {}",
                    ov.name(),
                    ov.number(),
                    nv.number()
                ),
            ),
            (None, None) => r.push(
                Severity::Warning,
                &path,
                format!(
                    "enum value {} ({}) removed: old data reads as the zero value",
                    ov.name(),
                    ov.number()
                ),
            ),
        }
    }
}

/// Can data written with `writer` be read with `reader`?
pub fn avro(writer: &Schema, reader: &Schema) -> Report {
    let mut r = Report::default();
    if let Err(e) = SchemaCompatibility::can_read(writer, reader) {
        r.push(
            Severity::Breaking,
            schema_name(reader),
            format!("reader cannot read writer's data: {e}"),
        );
    }
    r
}

/// Full compatibility between two versions: the new schema reads old data
/// (backward) and the old schema reads new data (forward).
pub fn avro_full(old: &Schema, new: &Schema) -> Report {
    let mut r = Report::default();
    if let Err(e) = SchemaCompatibility::can_read(old, new) {
        r.push(
            Severity::Breaking,
            schema_name(new),
            format!("backward: the new schema cannot read old data: {e}"),
        );
    }
    if let Err(e) = SchemaCompatibility::can_read(new, old) {
        r.push(
            Severity::Breaking,
            schema_name(old),
            format!("forward: the old schema cannot read new data: {e}"),
        );
    }
    r
}

fn schema_name(s: &Schema) -> String {
    s.name()
        .map(|n| n.fullname(None))
        .unwrap_or_else(|| "(unnamed schema)".into())
}
