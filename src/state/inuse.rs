//! Who wants each vfolder: the in-use guard of trash and purge.
//!
//! The storage role watches every node's kernels (`P/nodes/*/kernels/`) and
//! keeps, per kernel, the vfolders it mounts, and per vfolder the kernels
//! that mount it. A vfolder with any such kernel is never moved to the trash
//! nor purged. The guard errs on the side of keeping data: a kernel value
//! that does not parse counts as wanting every uuid written in it, plus what
//! it wanted before (its node holds its binds while it is malformed).

use std::collections::{BTreeMap, BTreeSet};

use uuid::Uuid;

use crate::spec::{KernelMount, KernelSpec};

/// What one kernel value says it mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The vfolders.
    pub ids: Vec<Uuid>,
    /// The value parsed: the list is exact. Otherwise it is every uuid
    /// found in the text, and adds to what the kernel wanted before.
    pub exact: bool,
}

impl Wanted {
    /// From a kernel value: its parsed spec, or the uuids in its text.
    pub fn of(spec: Option<&KernelSpec>, value: &[u8]) -> Self {
        match spec {
            Some(k) => Self {
                ids: k
                    .mounts
                    .iter()
                    .filter_map(|m| match m {
                        KernelMount::Vfolder { id, .. } => Some(*id),
                        KernelMount::Token { .. } => None,
                    })
                    .collect(),
                exact: true,
            },
            None => Self {
                ids: uuids_in(value),
                exact: false,
            },
        }
    }
}

/// The index, both ways. Kernels are named `<node>/<kernel>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InUse {
    by_kernel: BTreeMap<String, BTreeSet<Uuid>>,
    by_vfolder: BTreeMap<Uuid, BTreeSet<String>>,
}

impl InUse {
    /// Records what `kernel` now wants (O(its mounts)).
    pub fn set(&mut self, kernel: &str, wanted: Wanted) {
        let mut ids: BTreeSet<Uuid> = wanted.ids.into_iter().collect();
        if !wanted.exact {
            if let Some(before) = self.by_kernel.get(kernel) {
                ids.extend(before.iter().copied());
            }
        }
        self.remove(kernel);
        if ids.is_empty() {
            return;
        }
        for id in &ids {
            self.by_vfolder
                .entry(*id)
                .or_default()
                .insert(kernel.to_string());
        }
        self.by_kernel.insert(kernel.to_string(), ids);
    }

    /// Forgets `kernel` (its key was deleted).
    pub fn remove(&mut self, kernel: &str) {
        let Some(ids) = self.by_kernel.remove(kernel) else {
            return;
        };
        for id in ids {
            if let Some(users) = self.by_vfolder.get_mut(&id) {
                users.remove(kernel);
                if users.is_empty() {
                    self.by_vfolder.remove(&id);
                }
            }
        }
    }

    /// The kernels (`<node>/<kernel>`) that want `id`, in order.
    pub fn users(&self, id: &Uuid) -> Vec<String> {
        self.by_vfolder
            .get(id)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every kernel and what it wants (to carry the index over).
    pub fn entries(&self) -> Vec<(String, Wanted)> {
        self.by_kernel
            .iter()
            .map(|(k, ids)| {
                let ids = ids.iter().copied().collect();
                (k.clone(), Wanted { ids, exact: true })
            })
            .collect()
    }

    /// Every vfolder some indexed kernel wants.
    pub fn vfolders(&self) -> impl Iterator<Item = &Uuid> {
        self.by_vfolder.keys()
    }

    /// How many kernels are indexed.
    pub fn kernels(&self) -> usize {
        self.by_kernel.len()
    }
}

/// Every uuid written in `text`, hyphenated or as 32 hex digits (a
/// malformed value is still read for what it might want).
pub fn uuids_in(text: &[u8]) -> Vec<Uuid> {
    text.split(|b| !(b.is_ascii_hexdigit() || *b == b'-'))
        .filter(|t| t.len() == 32 || t.len() == 36)
        .filter_map(|t| Uuid::try_parse_ascii(t).ok())
        .collect()
}

/// What another node's kernel value mounts, read leniently: only
/// `mounts[].vfolder` matters here, and the checks that depend on that
/// node (its kernels root) are that node's to make. A value that is not a
/// mapping with a `mounts` list counts as wanting every uuid it names.
pub fn wanted_by_value(value: &[u8]) -> Wanted {
    let fallback = || Wanted {
        ids: uuids_in(value),
        exact: false,
    };
    if value.len() > crate::spec::MAX_VALUE_BYTES {
        return fallback();
    }
    let Ok(doc) = serde_yaml::from_slice::<serde_yaml::Value>(value) else {
        return fallback();
    };
    let Some(mounts) = doc.get("mounts").and_then(|m| m.as_sequence()) else {
        return fallback();
    };
    let mut ids = Vec::new();
    for m in mounts {
        match m.get("vfolder") {
            None => {}
            Some(v) => match v.as_str().and_then(|s| Uuid::try_parse(s.trim()).ok()) {
                Some(id) => ids.push(id),
                None => return fallback(),
            },
        }
    }
    Wanted { ids, exact: true }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    #[test]
    fn a_vfolder_is_in_use_while_any_kernel_wants_it() {
        let mut u = InUse::default();
        let exact = |ids: Vec<Uuid>| Wanted { ids, exact: true };
        u.set("n1/k1", exact(vec![id(1), id(2)]));
        u.set("n2/k1", exact(vec![id(1)]));
        assert_eq!(u.users(&id(1)), vec!["n1/k1", "n2/k1"]);
        u.set("n1/k1", exact(vec![id(2)]));
        assert_eq!(u.users(&id(1)), vec!["n2/k1"]);
        u.remove("n2/k1");
        assert!(u.users(&id(1)).is_empty());
        assert_eq!(u.users(&id(2)), vec!["n1/k1"]);
        assert_eq!(u.kernels(), 1);
    }

    #[test]
    fn a_malformed_value_keeps_what_it_wanted_and_adds_the_uuids_it_names() {
        let mut u = InUse::default();
        u.set(
            "n1/k1",
            Wanted {
                ids: vec![id(1)],
                exact: true,
            },
        );
        let text = format!("mounts: [{{vfolder: {}}}] garbage: [", id(2));
        u.set("n1/k1", Wanted::of(None, text.as_bytes()));
        assert_eq!(u.users(&id(1)), vec!["n1/k1"]);
        assert_eq!(u.users(&id(2)), vec!["n1/k1"]);
    }

    #[test]
    fn another_nodes_kernel_is_read_for_its_vfolders_whatever_its_home() {
        let a = "0123abcd-0000-4000-8000-000000000000";
        let b = "ffffffff-ffff-4fff-bfff-ffffffffffff";
        let v = format!("{{home: /elsewhere/k1, mounts: [{{vfolder: {a}}}, {{volume: d, token: read}}, {{vfolder: '{}'}}]}}", b.replace('-', ""));
        let w = wanted_by_value(v.as_bytes());
        assert!(w.exact);
        assert_eq!(
            w.ids,
            vec![Uuid::parse_str(a).unwrap(), Uuid::parse_str(b).unwrap()]
        );
        let w = wanted_by_value(format!("mounts: [{{vfolder: {a}}}, oops").as_bytes());
        assert!(!w.exact);
        assert_eq!(w.ids, vec![Uuid::parse_str(a).unwrap()]);
    }

    #[test]
    fn uuids_are_found_anywhere_in_the_text_and_nothing_else_is() {
        let a = "0123abcd-0000-4000-8000-000000000000";
        let b = "ffffffff-ffff-4fff-bfff-ffffffffffff";
        let text = format!(
            "é{a}x{}\n0123abcd-0000-4000-8000-00000000000",
            b.replace('-', "")
        );
        assert_eq!(
            uuids_in(text.as_bytes()),
            vec![Uuid::parse_str(a).unwrap(), Uuid::parse_str(b).unwrap()]
        );
        assert!(uuids_in(b"no ids here").is_empty());
    }
}
