//! The etcd key schema (v1): classifying desired keys and naming status keys.

use uuid::Uuid;

use crate::names::{escape_key, is_valid_object_name};

/// Key layout for one prefix and one node.
#[derive(Debug, Clone)]
pub struct Keys {
    /// The schema prefix `P`, e.g. `/vfolderd`.
    pub prefix: String,
    /// This node's name.
    pub node: String,
    /// Watch every node's kernels, not only this node's (storage role: the
    /// in-use guard of trash and purge reads who wants each vfolder).
    pub all_kernels: bool,
}

/// What a desired key names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKey {
    /// `P/volumes/<name>`.
    Volume(String),
    /// `P/vfolders/<uuid>`.
    Vfolder(Uuid),
    /// `P/nodes/<this node>/kernels/<id>`.
    Kernel(String),
    /// `P/nodes/<another node>/kernels/<id>` (storage role only), as
    /// `<node>/<id>`.
    ForeignKernel(String),
}

/// The result of classifying a key seen in a desired range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// A well-formed desired key.
    Object(ObjectKey),
    /// A key inside a desired range whose own name is invalid: it gets a
    /// status under `rejected/`.
    Invalid {
        /// Why.
        reason: String,
    },
    /// Not ours to look at (another node, status keys, unknown subtrees).
    Ignored,
}

impl Keys {
    /// Builds the layout.
    pub fn new(prefix: &str, node: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_string(),
            node: node.to_string(),
            all_kernels: false,
        }
    }

    /// The layout of a storage node, which watches every node's kernels.
    pub fn watching_all_kernels(mut self, yes: bool) -> Self {
        self.all_kernels = yes;
        self
    }

    /// `P/volumes/`.
    pub fn volumes_prefix(&self) -> String {
        format!("{}/volumes/", self.prefix)
    }
    /// `P/vfolders/`.
    pub fn vfolders_prefix(&self) -> String {
        format!("{}/vfolders/", self.prefix)
    }
    /// `P/nodes/<node>/kernels/`.
    pub fn kernels_prefix(&self) -> String {
        format!("{}/nodes/{}/kernels/", self.prefix, self.node)
    }
    /// `P/cluster`: the cluster's id (the safety brake).
    pub fn cluster(&self) -> String {
        format!("{}/cluster", self.prefix)
    }
    /// `P/nodes/`: every node's kernels.
    pub fn nodes_prefix(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }
    /// The ranges this node watches whole: a storage node every volume,
    /// vfolder and node's kernels; an agent only the volumes (few, and
    /// startup volumes need no kernel) and its own kernels. An agent follows
    /// only the vfolder records its kernels use, key by key
    /// ([`crate::state::follow`]), so its cost follows its own kernels, not
    /// every user's folders in the cluster.
    pub fn watched_prefixes(&self) -> Vec<String> {
        if self.follows_vfolders() {
            vec![self.volumes_prefix(), self.kernels_prefix()]
        } else {
            self.desired_prefixes().to_vec()
        }
    }

    /// Whether this node follows vfolder records one by one (an agent)
    /// instead of watching them all (a storage node).
    pub fn follows_vfolders(&self) -> bool {
        !self.all_kernels
    }

    /// The three desired ranges whole (the third covers every node's
    /// kernels on a storage node): what a storage node watches, and what
    /// the operator commands list.
    pub fn desired_prefixes(&self) -> [String; 3] {
        let kernels = if self.all_kernels {
            self.nodes_prefix()
        } else {
            self.kernels_prefix()
        };
        [self.volumes_prefix(), self.vfolders_prefix(), kernels]
    }

    /// Classifies a key from one of the desired ranges.
    pub fn classify(&self, key: &str) -> Classified {
        let invalid = |reason: String| Classified::Invalid { reason };
        if let Some(rest) = key.strip_prefix(&self.volumes_prefix()) {
            return if is_valid_object_name(rest) {
                Classified::Object(ObjectKey::Volume(rest.to_string()))
            } else {
                invalid(format!(
                    "volume name {rest:?} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,62}}"
                ))
            };
        }
        if let Some(rest) = key.strip_prefix(&self.vfolders_prefix()) {
            return match Uuid::parse_str(rest) {
                Ok(id) if rest.len() == 36 => Classified::Object(ObjectKey::Vfolder(id)),
                _ => invalid(format!("vfolder key {rest:?} is not a hyphenated uuid")),
            };
        }
        if let Some(rest) = key.strip_prefix(&self.kernels_prefix()) {
            return if is_valid_object_name(rest) {
                Classified::Object(ObjectKey::Kernel(rest.to_string()))
            } else {
                invalid(format!(
                    "kernel id {rest:?} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,62}}"
                ))
            };
        }
        if self.all_kernels {
            return self.classify_foreign(key);
        }
        Classified::Ignored
    }

    /// Another node's kernel (`P/nodes/<node>/kernels/<id>`); anything else
    /// under `P/nodes/` is not ours. An invalid name there is that node's
    /// to reject, not this one's.
    fn classify_foreign(&self, key: &str) -> Classified {
        let Some(rest) = key.strip_prefix(&self.nodes_prefix()) else {
            return Classified::Ignored;
        };
        match rest.split_once("/kernels/") {
            Some((node, id)) if is_valid_object_name(node) && is_valid_object_name(id) => {
                Classified::Object(ObjectKey::ForeignKernel(format!("{node}/{id}")))
            }
            _ => Classified::Ignored,
        }
    }

    /// The desired key of an object.
    pub fn object_key(&self, obj: &ObjectKey) -> String {
        match obj {
            ObjectKey::Volume(v) => format!("{}{v}", self.volumes_prefix()),
            ObjectKey::Vfolder(id) => format!("{}{id}", self.vfolders_prefix()),
            ObjectKey::Kernel(k) => format!("{}{k}", self.kernels_prefix()),
            ObjectKey::ForeignKernel(nk) => match nk.split_once('/') {
                Some((n, k)) => format!("{}{n}/kernels/{k}", self.nodes_prefix()),
                None => format!("{}{nk}", self.nodes_prefix()),
            },
        }
    }

    /// `P/status/nodes/<node>` (under a lease).
    pub fn node_status(&self) -> String {
        format!("{}/status/nodes/{}", self.prefix, self.node)
    }
    /// `P/status/nodes/<node>/` — everything this node writes about itself.
    pub fn node_status_prefix(&self) -> String {
        format!("{}/status/nodes/{}/", self.prefix, self.node)
    }
    /// `P/status/nodes/<node>/volumes/<volume>`.
    pub fn volume_status(&self, volume: &str) -> String {
        format!("{}volumes/{volume}", self.node_status_prefix())
    }
    /// `P/status/nodes/<node>/kernels/<id>`.
    pub fn kernel_status(&self, id: &str) -> String {
        format!("{}kernels/{id}", self.node_status_prefix())
    }
    /// `P/events/<node>/` — this node's events ([`crate::state::events`]).
    pub fn events_prefix(&self) -> String {
        format!("{}/events/{}/", self.prefix, self.node)
    }
    /// `P/status/vfolders/`.
    pub fn vfolder_status_prefix(&self) -> String {
        format!("{}/status/vfolders/", self.prefix)
    }
    /// `P/status/vfolders/<uuid>`.
    pub fn vfolder_status(&self, id: &Uuid) -> String {
        format!("{}{id}", self.vfolder_status_prefix())
    }
    /// `P/leaders/volumes/<volume>`: the election of the storage node that
    /// does `volume`'s directory work and writes its vfolders' statuses.
    pub fn volume_election(&self, volume: &str) -> String {
        format!("{}/leaders/volumes/{volume}", self.prefix)
    }
    /// `P/leaders/cluster`: the election of the storage node that writes the
    /// statuses of vfolder records no volume claims (malformed ones).
    pub fn cluster_election(&self) -> String {
        format!("{}/leaders/cluster", self.prefix)
    }
    /// `P/status/nodes/<node>/rejected/<escaped key after the prefix>`.
    pub fn rejected_status(&self, key: &str) -> String {
        let after = key
            .strip_prefix(&self.prefix)
            .unwrap_or(key)
            .trim_start_matches('/');
        format!(
            "{}rejected/{}",
            self.node_status_prefix(),
            escape_key(after)
        )
    }
}

/// The end of the range covering every key starting with `prefix` (etcd's
/// "prefix end": the last byte incremented).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The prefix this process logs vfolder keys under (set once at start:
/// log lines about a vfolder carry `P/vfolders/<uuid>` where the code that
/// logs them holds no [`Keys`]).
static LOG_PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the prefix [`vfolder_log_key`] uses (the first call wins).
pub fn set_log_prefix(prefix: &str) {
    let _ = LOG_PREFIX.set(prefix.to_string());
}

/// `P/volumes/<name>`, for a log line.
pub fn volume_log_key(name: &str) -> String {
    let p = LOG_PREFIX.get().map_or("", String::as_str);
    format!("{p}/volumes/{name}")
}

/// `P/vfolders/<uuid>`, for a log line.
pub fn vfolder_log_key(id: &Uuid) -> String {
    let p = LOG_PREFIX.get().map_or("", String::as_str);
    format!("{p}/vfolders/{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new("/vfolderd", "n1")
    }

    #[test]
    fn classify_recognises_each_kind() {
        let k = keys();
        assert_eq!(
            k.classify("/vfolderd/volumes/v1"),
            Classified::Object(ObjectKey::Volume("v1".into()))
        );
        let id = Uuid::new_v4();
        assert_eq!(
            k.classify(&format!("/vfolderd/vfolders/{id}")),
            Classified::Object(ObjectKey::Vfolder(id))
        );
        assert_eq!(
            k.classify("/vfolderd/nodes/n1/kernels/k1"),
            Classified::Object(ObjectKey::Kernel("k1".into()))
        );
        assert_eq!(
            k.classify("/vfolderd/nodes/n2/kernels/k1"),
            Classified::Ignored
        );
    }

    #[test]
    fn a_storage_node_sees_every_nodes_kernels_and_nothing_else_under_nodes() {
        let k = keys().watching_all_kernels(true);
        assert_eq!(k.desired_prefixes()[2], "/vfolderd/nodes/");
        assert_eq!(
            k.classify("/vfolderd/nodes/n1/kernels/k1"),
            Classified::Object(ObjectKey::Kernel("k1".into()))
        );
        assert_eq!(
            k.classify("/vfolderd/nodes/n2/kernels/k1"),
            Classified::Object(ObjectKey::ForeignKernel("n2/k1".into()))
        );
        assert_eq!(
            k.object_key(&ObjectKey::ForeignKernel("n2/k1".into())),
            "/vfolderd/nodes/n2/kernels/k1"
        );
        for ignored in [
            "/vfolderd/nodes/n2/other/k1",
            "/vfolderd/nodes/n2/kernels/a b",
            "/vfolderd/nodes/../kernels/k1",
        ] {
            assert_eq!(k.classify(ignored), Classified::Ignored, "{ignored}");
        }
    }

    #[test]
    fn classify_flags_invalid_names() {
        let k = keys();
        assert!(matches!(
            k.classify("/vfolderd/volumes/a b"),
            Classified::Invalid { .. }
        ));
        assert!(matches!(
            k.classify("/vfolderd/vfolders/not-a-uuid"),
            Classified::Invalid { .. }
        ));
        assert!(matches!(
            k.classify("/vfolderd/nodes/n1/kernels/../x"),
            Classified::Invalid { .. }
        ));
    }

    #[test]
    fn rejected_status_key_is_escaped() {
        assert_eq!(
            keys().rejected_status("/vfolderd/volumes/a b"),
            "/vfolderd/status/nodes/n1/rejected/volumes%2Fa%20b"
        );
    }

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
    }
}
