//! Every cluster-map snapshot of a session, within a memory budget: when the budget is
//! exceeded the oldest within-epoch snapshots go first, so the start of every epoch and the
//! most recent steps stay.

use serde::{Deserialize, Serialize};

use crate::train::ClusterMap;

/// The cluster maps of the preview images at one moment of training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Epoch (0: the untrained network).
    pub epoch: usize,
    /// Step within the epoch (0: right after the epoch's clustering).
    pub step: usize,
    /// One map per preview image.
    pub maps: Vec<ClusterMap>,
}

impl Snapshot {
    /// Approximate heap bytes held.
    pub fn bytes(&self) -> usize {
        self.maps
            .iter()
            .map(|map| map.labels.len() * 2 + map.similarity.len() * 4 + 64)
            .sum::<usize>()
            + 64
    }

    /// Position on a time axis in epochs: `epoch - 1 + step / steps_per_epoch`.
    pub fn time(&self, steps_per_epoch: usize) -> f64 {
        self.epoch.saturating_sub(1) as f64 + self.step as f64 / steps_per_epoch.max(1) as f64
    }
}

/// Snapshots in training order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timeline {
    snapshots: Vec<Snapshot>,
    budget_bytes: usize,
    bytes: usize,
}

/// 256 MiB of maps: hundreds of snapshots of a typical preview set.
pub const DEFAULT_TIMELINE_BUDGET_BYTES: usize = 256 << 20;

impl Default for Timeline {
    fn default() -> Self {
        Self::with_budget(DEFAULT_TIMELINE_BUDGET_BYTES)
    }
}

impl Timeline {
    /// An empty timeline that keeps at most about `budget_bytes` of maps.
    pub fn with_budget(budget_bytes: usize) -> Self {
        Self {
            snapshots: Vec::new(),
            budget_bytes,
            bytes: 0,
        }
    }

    /// Adds a snapshot (replacing one of the same epoch and step), then thins if needed.
    pub fn push(&mut self, snapshot: Snapshot) {
        if let Some(existing) = self
            .snapshots
            .iter_mut()
            .find(|s| (s.epoch, s.step) == (snapshot.epoch, snapshot.step))
        {
            self.bytes -= existing.bytes();
            self.bytes += snapshot.bytes();
            *existing = snapshot;
        } else {
            self.bytes += snapshot.bytes();
            self.snapshots.push(snapshot);
        }
        self.thin();
    }

    /// Drops snapshots, oldest within-epoch ones first, then the oldest epoch starts (never
    /// the newest), until the budget holds.
    fn thin(&mut self) {
        while self.bytes > self.budget_bytes && self.snapshots.len() > 1 {
            let last = self.snapshots.len() - 1;
            let victim = self.snapshots[..last]
                .iter()
                .position(|snapshot| snapshot.step != 0)
                .unwrap_or(0);
            let removed = self.snapshots.remove(victim);
            self.bytes -= removed.bytes();
        }
    }

    /// The snapshots, oldest first.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// Number of snapshots kept.
    pub fn len(&self) -> usize {
        self.snapshots.len()
    }

    /// Whether nothing was kept yet.
    pub fn is_empty(&self) -> bool {
        self.snapshots.is_empty()
    }

    /// Approximate heap bytes of all kept maps.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The newest snapshot.
    pub fn latest(&self) -> Option<&Snapshot> {
        self.snapshots.last()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A one-map snapshot of 16 x 16 cells, for tests.
    pub(crate) fn snapshot(epoch: usize, step: usize) -> Snapshot {
        Snapshot {
            epoch,
            step,
            maps: vec![ClusterMap {
                image_index: 0,
                image_name: "a.png".into(),
                width: 16,
                height: 16,
                labels: vec![0; 256],
                similarity: vec![1.0; 256],
            }],
        }
    }

    #[test]
    fn thinning_keeps_epoch_starts_and_the_newest_within_budget() {
        let one = snapshot(0, 0).bytes();
        let mut timeline = Timeline::with_budget(one * 12);
        for epoch in 1..=10 {
            for step in 0..5 {
                timeline.push(snapshot(epoch, step));
                assert!(timeline.bytes() <= one * 12);
            }
        }
        let kept: Vec<(usize, usize)> = timeline
            .snapshots()
            .iter()
            .map(|s| (s.epoch, s.step))
            .collect();
        assert_eq!(kept.len(), 12);
        assert_eq!(kept.last(), Some(&(10, 4)));
        // Every epoch start survives; the remaining room holds the newest steps.
        for epoch in 1..=10 {
            assert!(
                kept.contains(&(epoch, 0)),
                "epoch {epoch} start lost: {kept:?}"
            );
        }
        assert!(kept.windows(2).all(|pair| pair[0] < pair[1]), "order kept");
    }
}
