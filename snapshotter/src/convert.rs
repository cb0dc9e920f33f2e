//! Conversion between containerd's types and the store's: snapshot info, kinds, usage,
//! mounts, Update's field paths, Walk's field lookup. Nothing else in the daemon builds
//! or reads one of containerd's snapshot types.

use std::collections::{BTreeMap, HashMap};

use cas::index::{DiskUsage, Kind, Record};
use cas::mounts::Mount;
use cas::snapshots::LabelChange;
use containerd_snapshots::api::types::Mount as ApiMount;
use containerd_snapshots::{Info, Usage};

use crate::error::ServiceError;

/// containerd's kind of a store kind.
pub fn kind(kind: Kind) -> containerd_snapshots::Kind {
    match kind {
        Kind::View => containerd_snapshots::Kind::View,
        Kind::Active => containerd_snapshots::Kind::Active,
        Kind::Committed => containerd_snapshots::Kind::Committed,
    }
}

/// containerd's info of the snapshot `key` with record `rec`.
pub fn info(key: String, rec: Record) -> Info {
    Info {
        kind: kind(rec.kind),
        name: key,
        parent: rec.parent.unwrap_or_default(),
        labels: rec.labels.into_iter().collect(),
        created_at: rec.created,
        updated_at: rec.updated,
    }
}

/// containerd's usage.
pub fn usage(u: DiskUsage) -> Usage {
    Usage {
        size: u.size,
        inodes: u.inodes,
    }
}

/// containerd's mounts (the target is containerd's to choose).
pub fn mounts(mounts: Vec<Mount>) -> Vec<ApiMount> {
    mounts
        .into_iter()
        .map(|m| ApiMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

/// A request's labels, in the store's order.
pub fn labels(labels: HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

/// A request's parent: containerd sends `""` for none.
pub fn parent(parent: &str) -> Option<&str> {
    (!parent.is_empty()).then_some(parent)
}

/// The label changes of an Update with `labels` and `fieldpaths`: no paths replace all
/// labels; `labels` does too; `labels.<key>` sets or removes one. Only labels are
/// mutable, as in containerd's own snapshotters; any other path is refused.
pub fn label_changes(
    key: &str,
    labels: HashMap<String, String>,
    fieldpaths: Option<Vec<String>>,
) -> Result<Vec<LabelChange>, ServiceError> {
    let new = self::labels(labels);
    let Some(paths) = fieldpaths.filter(|p| !p.is_empty()) else {
        return Ok(vec![LabelChange::Replace(new)]);
    };
    paths
        .into_iter()
        .map(|path| {
            if path == "labels" {
                Ok(LabelChange::Replace(new.clone()))
            } else if let Some(label) = path.strip_prefix("labels.") {
                Ok(match new.get(label) {
                    Some(v) => LabelChange::Set(label.to_string(), v.clone()),
                    None => LabelChange::Unset(label.to_string()),
                })
            } else {
                Err(ServiceError::InvalidArgument(format!(
                    "cannot update field {path:?} of snapshot {key:?}: only labels are mutable"
                )))
            }
        })
        .collect()
}

/// The value of a Walk filter's field path for snapshot `key`: `kind`, `name`,
/// `parent` (`""` without one), `labels.<key>` (the rest of the path, dots included).
pub fn field(key: &str, rec: &Record, path: &[String]) -> Option<String> {
    match path.first().map(String::as_str) {
        Some("kind") => Some(rec.kind.as_str().to_string()),
        Some("name") => Some(key.to_string()),
        Some("parent") => Some(rec.parent.clone().unwrap_or_default()),
        Some("labels") if path.len() > 1 => rec.labels.get(&path[1..].join(".")).cloned(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn rec() -> Record {
        Record {
            id: 7,
            kind: Kind::Active,
            parent: Some("p".into()),
            labels: BTreeMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]),
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
            usage: DiskUsage::default(),
            logical_bytes: 0,
        }
    }

    #[test]
    fn info_carries_every_field() {
        let i = info("k".into(), rec());
        assert_eq!(i.name, "k");
        assert_eq!(i.parent, "p");
        assert!(matches!(i.kind, containerd_snapshots::Kind::Active));
        assert_eq!(i.labels.get("b").map(String::as_str), Some("2"));
        let mut r = rec();
        r.parent = None;
        assert_eq!(info("k".into(), r).parent, "");
    }

    #[test]
    fn mounts_leave_the_target_to_containerd() {
        let m = mounts(vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec!["lowerdir=/a::/b".into()],
        }]);
        assert_eq!(m[0].r#type, "overlay");
        assert_eq!(m[0].target, "");
        assert_eq!(m[0].options, ["lowerdir=/a::/b"]);
    }

    #[test]
    fn update_paths_become_label_changes() {
        let labels = HashMap::from([("a".to_string(), "9".to_string())]);
        let all = label_changes("k", labels.clone(), None).unwrap();
        assert_eq!(
            all,
            [LabelChange::Replace(BTreeMap::from([(
                "a".into(),
                "9".into()
            )]))]
        );
        assert_eq!(
            label_changes("k", labels.clone(), Some(vec![])).unwrap(),
            all
        );
        let some = label_changes(
            "k",
            labels.clone(),
            Some(vec!["labels.a".into(), "labels.gone".into()]),
        )
        .unwrap();
        assert_eq!(
            some,
            [
                LabelChange::Set("a".into(), "9".into()),
                LabelChange::Unset("gone".into())
            ]
        );
        let refused = label_changes("k", labels, Some(vec!["parent".into()]));
        assert!(matches!(refused, Err(ServiceError::InvalidArgument(_))));
    }

    #[test]
    fn walk_fields() {
        let r = rec();
        let f = |p: &[&str]| {
            field(
                "k",
                &r,
                &p.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(f(&["kind"]).as_deref(), Some("active"));
        assert_eq!(f(&["name"]).as_deref(), Some("k"));
        assert_eq!(f(&["parent"]).as_deref(), Some("p"));
        assert_eq!(f(&["labels", "a"]).as_deref(), Some("1"));
        assert_eq!(f(&["labels"]), None);
        assert_eq!(f(&["id"]), None);
    }
}
