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

    /// How many kernels are indexed.
    pub fn kernels(&self) -> usize {
        self.by_kernel.len()
    }
}

/// Every hyphenated uuid written in `text` (a malformed value is still
/// read for what it might want).
pub fn uuids_in(text: &[u8]) -> Vec<Uuid> {
    const LEN: usize = 36;
    let mut out = Vec::new();
    let mut i = 0;
    while i + LEN <= text.len() {
        let window = &text[i..i + LEN];
        let shaped = window.iter().enumerate().all(|(j, b)| match j {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
        if shaped {
            if let Some(id) = std::str::from_utf8(window)
                .ok()
                .and_then(|s| Uuid::parse_str(s).ok())
            {
                out.push(id);
                i += LEN;
                continue;
            }
        }
        i += 1;
    }
    out
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
    fn uuids_are_found_anywhere_in_the_text_and_nothing_else_is() {
        let a = "0123abcd-0000-4000-8000-000000000000";
        let b = "ffffffff-ffff-4fff-bfff-ffffffffffff";
        let text = format!("é{a}x{b}\n0123abcd-0000-4000-8000-00000000000");
        assert_eq!(
            uuids_in(text.as_bytes()),
            vec![Uuid::parse_str(a).unwrap(), Uuid::parse_str(b).unwrap()]
        );
        assert!(uuids_in(b"no ids here").is_empty());
    }
}
