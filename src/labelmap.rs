//! What the user made of the clusters: a name and a colour for each, merges (many clusters
//! into one) and clusters marked "ignore". Saved as `RUN_DIR/labelmap.json` and applied by the
//! app's maps, statistics and galleries and by the exporters.
//!
//! Ids stay the trainer's cluster ids: a merged cluster takes the id of the cluster it was
//! merged into (its *root*), so exported index masks use the same numbers the app shows, and
//! an ignored root is written as [`IGNORE_INDEX`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::palette::cluster_colour;

/// The index written for pixels of ignored clusters (as the evaluation's "unlabelled").
pub const IGNORE_INDEX: u8 = 255;
pub use crate::run::paths::LABELMAP_FILE;

/// The user's decisions about one cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterLabel {
    /// A name; `None` shows as `cluster N`.
    pub name: Option<String>,
    /// An RGB colour; `None` uses the palette's.
    pub colour: Option<[u8; 3]>,
    /// Pixels of this cluster are not a class ("ignore": 255 in index masks).
    pub ignore: bool,
    /// Merged into another cluster: it then takes that cluster's id, name and colour.
    pub merged_into: Option<usize>,
}

/// One edit of the label map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LabelEdit {
    /// Names a cluster (an empty name clears it).
    Rename {
        /// The cluster (any member of a merge names the whole merge).
        cluster: usize,
        /// The new name.
        name: String,
    },
    /// Changes a cluster's colour.
    Recolour {
        /// The cluster.
        cluster: usize,
        /// RGB.
        colour: [u8; 3],
    },
    /// Merges clusters into one (`into` keeps its id, name and colour).
    Merge {
        /// Clusters to merge.
        sources: Vec<usize>,
        /// The cluster they join.
        into: usize,
    },
    /// Undoes a merge: the cluster becomes its own again.
    Unmerge {
        /// The cluster.
        cluster: usize,
    },
    /// Marks a cluster ignored or not.
    SetIgnored {
        /// The cluster.
        cluster: usize,
        /// Ignored?
        ignored: bool,
    },
    /// Names every cluster after a class (the Hungarian matching against the labels).
    AdoptNames {
        /// `names[k]`: the name for cluster `k`, if matched.
        names: Vec<Option<String>>,
    },
}

/// Errors of reading, writing or editing a label map.
#[derive(Debug, thiserror::Error)]
pub enum LabelMapError {
    /// The file could not be read or written.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// An edit named a cluster that does not exist.
    #[error("there is no cluster {cluster} (the run has {clusters})")]
    NoSuchCluster {
        /// The id given.
        cluster: usize,
        /// Clusters in the map.
        clusters: usize,
    },
}

/// Names, colours, merges and ignores for the K clusters of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelMap {
    /// Entry `k` is cluster `k`.
    pub clusters: Vec<ClusterLabel>,
}

/// One line of an export's legend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegendEntry {
    /// The id in the index masks.
    pub id: usize,
    /// The name.
    pub name: String,
    /// RGB.
    pub colour: [u8; 3],
    /// Fraction of exported pixels with this id.
    pub pixel_share: f64,
    /// The trainer's clusters that make up this id.
    pub clusters: Vec<usize>,
}

impl LabelMap {
    /// `clusters` clusters, none named, merged or ignored.
    pub fn new(clusters: usize) -> Self {
        Self {
            clusters: vec![ClusterLabel::default(); clusters],
        }
    }

    /// Number of clusters (before merges).
    pub fn len(&self) -> usize {
        self.clusters.len()
    }

    /// Whether there are no clusters.
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }

    /// Grows (never shrinks) to `clusters` entries, e.g. for a run with more clusters.
    pub fn ensure_len(&mut self, clusters: usize) {
        if self.clusters.len() < clusters {
            self.clusters.resize(clusters, ClusterLabel::default());
        }
    }

    /// The cluster `cluster` is shown and exported as: the end of its merge chain. Ids out of
    /// range map to themselves; a (corrupt) cycle stops at the first repeat.
    pub fn root(&self, cluster: usize) -> usize {
        let mut current = cluster;
        for _ in 0..=self.clusters.len() {
            match self
                .clusters
                .get(current)
                .and_then(|label| label.merged_into)
            {
                Some(next) if next != current => current = next,
                _ => return current,
            }
        }
        current
    }

    /// The displayed name of a cluster (its root's).
    pub fn name(&self, cluster: usize) -> String {
        let root = self.root(cluster);
        self.clusters
            .get(root)
            .and_then(|label| label.name.clone())
            .filter(|name| !name.trim().is_empty())
            .unwrap_or_else(|| format!("cluster {root}"))
    }

    /// Whether the user named the cluster (or its root).
    pub fn is_named(&self, cluster: usize) -> bool {
        self.clusters
            .get(self.root(cluster))
            .is_some_and(|label| label.name.as_ref().is_some_and(|n| !n.trim().is_empty()))
    }

    /// The displayed colour of a cluster (its root's).
    pub fn colour(&self, cluster: usize) -> [u8; 3] {
        let root = self.root(cluster);
        self.clusters
            .get(root)
            .and_then(|label| label.colour)
            .unwrap_or_else(|| cluster_colour(root))
    }

    /// Whether a cluster's pixels are ignored (its root is).
    pub fn is_ignored(&self, cluster: usize) -> bool {
        self.clusters
            .get(self.root(cluster))
            .is_some_and(|label| label.ignore)
    }

    /// The index-mask value of each of `clusters` clusters: its root id, or
    /// [`IGNORE_INDEX`] when ignored.
    pub fn output_ids(&self, clusters: usize) -> Vec<u8> {
        (0..clusters)
            .map(|cluster| {
                if self.is_ignored(cluster) {
                    IGNORE_INDEX
                } else {
                    u8::try_from(self.root(cluster))
                        .ok()
                        .filter(|&id| id != IGNORE_INDEX)
                        .unwrap_or(IGNORE_INDEX)
                }
            })
            .collect()
    }

    /// The ids that exist after merges and ignores, with their members, ascending.
    pub fn output_classes(&self, clusters: usize) -> Vec<(usize, Vec<usize>)> {
        self.groups_of(clusters, |cluster| !self.is_ignored(cluster))
    }

    /// Every merge group of the first `clusters` clusters, ignored ones included: roots
    /// ascending, each with its members ascending.
    pub fn merge_groups(&self, clusters: usize) -> Vec<(usize, Vec<usize>)> {
        self.groups_of(clusters, |_| true)
    }

    /// The clusters that pass `keep`, grouped by root: roots ascending, members ascending.
    fn groups_of(&self, clusters: usize, keep: impl Fn(usize) -> bool) -> Vec<(usize, Vec<usize>)> {
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for cluster in (0..clusters).filter(|&cluster| keep(cluster)) {
            let root = self.root(cluster);
            match groups.iter_mut().find(|(id, _)| *id == root) {
                Some((_, members)) => members.push(cluster),
                None => groups.push((root, vec![cluster])),
            }
        }
        groups.sort_by_key(|(id, _)| *id);
        groups
    }

    /// The legend of an export: one entry per output id, with its share of `pixel_counts`
    /// (counted per output id, 256 entries, index 255 = ignored).
    pub fn legend(&self, clusters: usize, pixel_counts: &[u64]) -> Vec<LegendEntry> {
        let counted: u64 = pixel_counts
            .iter()
            .enumerate()
            .filter(|(id, _)| *id != IGNORE_INDEX as usize)
            .map(|(_, count)| count)
            .sum();
        self.output_classes(clusters)
            .into_iter()
            .map(|(id, members)| LegendEntry {
                id,
                name: self.name(id),
                colour: self.colour(id),
                pixel_share: pixel_counts.get(id).copied().unwrap_or(0) as f64
                    / counted.max(1) as f64,
                clusters: members,
            })
            .collect()
    }

    /// Applies an edit.
    pub fn apply(&mut self, edit: &LabelEdit) -> Result<(), LabelMapError> {
        let clusters = self.clusters.len();
        let check = |cluster: usize| {
            if cluster < clusters {
                Ok(())
            } else {
                Err(LabelMapError::NoSuchCluster { cluster, clusters })
            }
        };
        match edit {
            LabelEdit::Rename { cluster, name } => {
                check(*cluster)?;
                let root = self.root(*cluster);
                let name = name.trim();
                self.clusters[root].name = (!name.is_empty()).then(|| name.to_string());
            }
            LabelEdit::Recolour { cluster, colour } => {
                check(*cluster)?;
                let root = self.root(*cluster);
                self.clusters[root].colour = Some(*colour);
            }
            LabelEdit::Merge { sources, into } => {
                check(*into)?;
                for &source in sources {
                    check(source)?;
                }
                let target = self.root(*into);
                for &source in sources {
                    let source_root = self.root(source);
                    if source_root != target {
                        // Everything that pointed at the old root follows it.
                        self.clusters[source_root].merged_into = Some(target);
                    }
                }
            }
            LabelEdit::Unmerge { cluster } => {
                check(*cluster)?;
                self.clusters[*cluster].merged_into = None;
            }
            LabelEdit::SetIgnored { cluster, ignored } => {
                check(*cluster)?;
                let root = self.root(*cluster);
                self.clusters[root].ignore = *ignored;
            }
            LabelEdit::AdoptNames { names } => {
                for (cluster, name) in names.iter().enumerate().take(clusters) {
                    if let Some(name) = name {
                        let root = self.root(cluster);
                        self.clusters[root].name = Some(name.clone());
                    }
                }
            }
        }
        Ok(())
    }

    /// Follows the trainer's renumbering after a merge or split: `origin[new]` is the old id
    /// that new id continues. Names, colours and ignores move with their clusters; clusters
    /// that no longer exist are dropped, and merges that pointed at them are undone.
    pub fn renumbered(&self, origin: &[Option<usize>]) -> Self {
        let new_id_of = |old: usize| origin.iter().position(|&from| from == Some(old));
        let clusters = origin
            .iter()
            .map(|from| {
                let Some(old) = from else {
                    return ClusterLabel::default();
                };
                let mut label = self.clusters.get(*old).cloned().unwrap_or_default();
                label.merged_into = label.merged_into.and_then(new_id_of);
                label
            })
            .collect();
        Self { clusters }
    }

    /// Where a run's label map lives.
    pub fn path_in(run_dir: &Path) -> PathBuf {
        crate::run::paths::label_map(run_dir)
    }

    /// The run's label map, or a fresh one for `clusters` clusters when it has none yet.
    pub fn load_or_new(run_dir: &Path, clusters: usize) -> Result<Self, LabelMapError> {
        let path = Self::path_in(run_dir);
        let mut map = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|error| LabelMapError::Io {
                path: path.clone(),
                reason: format!("not a valid label map ({error}); delete it to start afresh"),
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Self::new(clusters),
            Err(error) => {
                return Err(LabelMapError::Io {
                    path,
                    reason: error.to_string(),
                });
            }
        };
        map.ensure_len(clusters);
        map.check(&path, clusters)?;
        Ok(map)
    }

    /// Refuses merges a hand-edited file can hold but the app never makes: into a cluster the
    /// run does not have, into itself, or in a cycle (they would give wrong legends).
    fn check(&self, path: &Path, clusters: usize) -> Result<(), LabelMapError> {
        let problem = |reason: String| LabelMapError::Io {
            path: path.to_owned(),
            reason: format!("{reason}; correct it or delete the file to start afresh"),
        };
        for (cluster, label) in self.clusters.iter().enumerate().take(clusters) {
            match label.merged_into {
                Some(target) if target >= clusters => {
                    return Err(problem(format!(
                        "cluster {cluster} is merged into cluster {target}, but the run's \
                         clusters are 0..={}",
                        clusters.saturating_sub(1)
                    )));
                }
                Some(target) if target == cluster => {
                    return Err(problem(format!("cluster {cluster} is merged into itself")));
                }
                _ => {}
            }
        }
        for start in 0..clusters {
            let mut seen = vec![false; clusters];
            let mut current = start;
            while let Some(next) = self.clusters[current].merged_into {
                if seen[current] {
                    return Err(problem(format!(
                        "the merges from cluster {start} form a cycle"
                    )));
                }
                seen[current] = true;
                current = next;
            }
        }
        Ok(())
    }

    /// Saves atomically into the run folder.
    pub fn save(&self, run_dir: &Path) -> Result<(), LabelMapError> {
        let path = Self::path_in(run_dir);
        crate::fsutil::write_atomic(&path, |writer| {
            serde_json::to_writer_pretty(writer, self).map_err(std::io::Error::other)
        })
        .map_err(|error| LabelMapError::Io {
            path,
            reason: error.to_string(),
        })
    }
}

/// A label map with undo and redo.
#[derive(Debug, Clone, Default)]
pub struct LabelHistory {
    current: LabelMap,
    undo: Vec<LabelMap>,
    redo: Vec<LabelMap>,
    last_edit: Option<LabelEdit>,
}

/// Undo steps kept.
const UNDO_LIMIT: usize = 200;

impl LabelHistory {
    /// Starts from `map` with nothing to undo.
    pub fn new(map: LabelMap) -> Self {
        Self {
            current: map,
            undo: Vec::new(),
            redo: Vec::new(),
            last_edit: None,
        }
    }

    /// The map now.
    pub fn map(&self) -> &LabelMap {
        &self.current
    }

    /// Applies an edit; it can be undone. A failed edit changes nothing. Successive colour
    /// changes of one cluster (dragging in a colour picker) undo as one.
    pub fn apply(&mut self, edit: &LabelEdit) -> Result<(), LabelMapError> {
        let before = self.current.clone();
        self.current.apply(edit)?;
        if self.current == before {
            return Ok(());
        }
        let continues_last = matches!(
            (&self.last_edit, edit),
            (Some(LabelEdit::Recolour { cluster: a, .. }), LabelEdit::Recolour { cluster: b, .. })
                if a == b
        ) && !self.undo.is_empty();
        if !continues_last {
            self.undo.push(before);
            if self.undo.len() > UNDO_LIMIT {
                self.undo.remove(0);
            }
        }
        self.redo.clear();
        self.last_edit = Some(edit.clone());
        Ok(())
    }

    /// Reverts the last edit; false when there is none.
    pub fn undo(&mut self) -> bool {
        match self.undo.pop() {
            Some(previous) => {
                self.redo
                    .push(std::mem::replace(&mut self.current, previous));
                true
            }
            None => false,
        }
    }

    /// Re-applies the last undone edit; false when there is none.
    pub fn redo(&mut self) -> bool {
        self.last_edit = None;
        match self.redo.pop() {
            Some(next) => {
                self.undo.push(std::mem::replace(&mut self.current, next));
                true
            }
            None => false,
        }
    }

    /// Follows the trainer's renumbering ([`LabelMap::renumbered`]) in the map and in every
    /// step of its history, so an edit made before the trainer merged or split clusters can
    /// still be undone after it.
    pub fn renumber(&mut self, origin: &[Option<usize>]) {
        self.current = self.current.renumbered(origin);
        for map in self.undo.iter_mut().chain(self.redo.iter_mut()) {
            *map = map.renumbered(origin);
        }
        // A colour drag after the renumbering is a new step.
        self.last_edit = None;
    }

    /// Whether there is something to undo.
    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    /// Whether there is something to redo.
    pub fn can_redo(&self) -> bool {
        !self.redo.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_edited_label_maps_with_impossible_merges_are_refused_by_name() {
        let folder = tempfile::tempdir().unwrap();
        let write = |merges: &[(usize, usize)]| {
            let mut map = LabelMap::new(4);
            for &(cluster, target) in merges {
                map.clusters[cluster].merged_into = Some(target);
            }
            let text = serde_json::to_string(&map).unwrap();
            std::fs::write(LabelMap::path_in(folder.path()), text).unwrap();
        };
        for (merges, expected) in [
            (vec![(1, 9)], "merged into cluster 9"),
            (vec![(2, 255)], "merged into cluster 255"),
            (vec![(3, 3)], "merged into itself"),
            (vec![(0, 1), (1, 2), (2, 0)], "form a cycle"),
        ] {
            write(&merges);
            let message = LabelMap::load_or_new(folder.path(), 4)
                .unwrap_err()
                .to_string();
            assert!(
                message.contains(expected) && message.contains(LABELMAP_FILE),
                "{merges:?}: {message}"
            );
        }
        write(&[(0, 1), (1, 2)]);
        let map = LabelMap::load_or_new(folder.path(), 4).unwrap();
        assert_eq!(map.root(0), 2);
    }

    #[test]
    fn undo_survives_the_trainer_renumbering_the_clusters() {
        let mut history = LabelHistory::new(LabelMap::new(4));
        history
            .apply(&LabelEdit::Rename {
                cluster: 3,
                name: "sky".into(),
            })
            .unwrap();
        history
            .apply(&LabelEdit::Rename {
                cluster: 2,
                name: "road".into(),
            })
            .unwrap();
        // The trainer merged cluster 1 away: old 0, 2, 3 become 0, 1, 2.
        history.renumber(&[Some(0), Some(2), Some(3)]);
        assert_eq!(history.map().name(1), "road");
        assert_eq!(history.map().name(2), "sky");
        assert!(history.can_undo());
        assert!(history.undo());
        assert_ne!(
            history.map().name(1),
            "road",
            "the rename of road is undone"
        );
        assert_eq!(history.map().name(2), "sky", "the earlier edit stays");
        assert!(history.redo());
        assert_eq!(history.map().name(1), "road");
    }

    #[test]
    fn merges_ignores_names_and_undo_redo_behave_as_a_user_expects() {
        let mut history = LabelHistory::new(LabelMap::new(5));
        history
            .apply(&LabelEdit::Rename {
                cluster: 1,
                name: "road".into(),
            })
            .unwrap();
        history
            .apply(&LabelEdit::Merge {
                sources: vec![3, 4],
                into: 1,
            })
            .unwrap();
        history
            .apply(&LabelEdit::SetIgnored {
                cluster: 2,
                ignored: true,
            })
            .unwrap();
        let map = history.map();
        assert_eq!(map.name(4), "road");
        assert_eq!(map.colour(3), map.colour(1));
        assert_eq!(map.output_ids(5), vec![0, 1, IGNORE_INDEX, 1, 1]);
        assert_eq!(
            map.output_classes(5),
            vec![(0, vec![0]), (1, vec![1, 3, 4])]
        );
        // The cluster list also shows the ignored cluster, in its own group.
        assert_eq!(
            map.merge_groups(5),
            vec![(0, vec![0]), (1, vec![1, 3, 4]), (2, vec![2])]
        );
        let mut counts = vec![0u64; 256];
        counts[0] = 30;
        counts[1] = 70;
        counts[255] = 50;
        let legend = map.legend(5, &counts);
        assert_eq!(legend.len(), 2);
        assert_eq!(legend[1].name, "road");
        assert!((legend[1].pixel_share - 0.7).abs() < 1e-12);

        // Undo the ignore and the merge; redo the merge.
        assert!(history.undo());
        assert!(!history.map().is_ignored(2));
        assert!(history.undo());
        assert_eq!(history.map().output_ids(5), vec![0, 1, 2, 3, 4]);
        assert!(history.redo());
        assert_eq!(history.map().root(4), 1);
        // A new edit after an undo drops the redo branch.
        history.undo();
        history
            .apply(&LabelEdit::Recolour {
                cluster: 0,
                colour: [1, 2, 3],
            })
            .unwrap();
        assert!(!history.can_redo());
        // Dragging a colour picker is one undo step.
        for shade in 10..20 {
            history
                .apply(&LabelEdit::Recolour {
                    cluster: 0,
                    colour: [shade, 2, 3],
                })
                .unwrap();
        }
        assert_eq!(history.map().colour(0), [19, 2, 3]);
        history.undo();
        assert_eq!(history.map().colour(0), crate::palette::cluster_colour(0));
        // Bad ids are refused without changing anything.
        let before = history.map().clone();
        assert!(
            history
                .apply(&LabelEdit::Merge {
                    sources: vec![9],
                    into: 0
                })
                .is_err()
        );
        assert_eq!(history.map(), &before);
    }

    #[test]
    fn a_label_map_survives_a_save_and_reload() {
        let folder = tempfile::tempdir().unwrap();
        let mut map = LabelMap::load_or_new(folder.path(), 3).unwrap();
        map.apply(&LabelEdit::AdoptNames {
            names: vec![Some("sky".into()), None, Some("tree".into())],
        })
        .unwrap();
        map.save(folder.path()).unwrap();
        let reloaded = LabelMap::load_or_new(folder.path(), 3).unwrap();
        assert_eq!(reloaded, map);
        assert_eq!(reloaded.name(1), "cluster 1");
        std::fs::write(LabelMap::path_in(folder.path()), "{oops").unwrap();
        let error = LabelMap::load_or_new(folder.path(), 3)
            .unwrap_err()
            .to_string();
        assert!(error.contains("labelmap.json") && error.contains("not a valid label map"));
    }
}
