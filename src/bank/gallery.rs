//! The explorer's gallery questions answered from a bank: the patches most like the one
//! under a pixel, or a page of a cluster's most typical or most unusual members, each with
//! where it lies and its nearest centroid.

use std::time::Instant;

use super::{BankIndex, FeatureBank, MemberOrder, Neighbour};

/// Patches per gallery page.
pub const GALLERY_PAGE: usize = 24;

/// What the gallery shows.
#[derive(Debug, Clone, PartialEq)]
pub enum GalleryQuery {
    /// The patches most similar to the patch under a pixel.
    Pixel {
        /// Image name.
        image: String,
        /// Position in `0..1` over the image's base square.
        u: f32,
        /// Position in `0..1`.
        v: f32,
    },
    /// A cluster's members, most typical or most unusual first, one page.
    Cluster {
        /// The cluster.
        cluster: usize,
        /// Typical or outliers.
        outliers: bool,
        /// First member of the page.
        offset: usize,
    },
}

/// One patch in a gallery.
#[derive(Debug, Clone)]
pub struct GalleryHit {
    /// Image name.
    pub image: String,
    /// The patch's top-left corner in `0..1` coordinates of the image's base square.
    pub uv_min: [f32; 2],
    /// The patch's side in the same coordinates.
    pub uv_size: f32,
    /// Similarity to the query (or to the centroid for cluster galleries).
    pub similarity: f32,
    /// Nearest centroid.
    pub cluster: usize,
}

/// A finished query.
#[derive(Debug, Clone)]
pub struct GalleryResult {
    /// The query answered.
    pub query: GalleryQuery,
    /// Best first.
    pub hits: Vec<GalleryHit>,
    /// Members of the cluster (cluster galleries).
    pub total: Option<usize>,
    /// How long the search took.
    pub milliseconds: f64,
    /// Patches in the bank.
    pub bank_size: usize,
    /// Lists probed and lists in all, when the bank's index answered (approximate).
    pub index_probes: Option<(usize, usize)>,
}

/// Why a gallery question has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GalleryError {
    /// The image is not one the bank was built from.
    #[error("{0} is not in the feature bank; rebuild it")]
    NotInBank(String),
    /// The point lies outside the image.
    #[error("that point is outside the image")]
    OutsideImage,
    /// Cluster galleries need centroids.
    #[error("no centroids yet: wait for the first clustering")]
    NoCentroids,
}

/// Answers `query` from `bank` (through `search_index` for pixel queries when there is one),
/// naming each hit's nearest of `centroids` (`K x dim`; empty: every hit is cluster 0).
pub fn answer(
    bank: &FeatureBank,
    search_index: Option<&BankIndex>,
    query: &GalleryQuery,
    centroids: &[f32],
) -> Result<GalleryResult, GalleryError> {
    let started = Instant::now();
    let (neighbours, total): (Vec<Neighbour>, Option<usize>) = match query {
        GalleryQuery::Pixel { image, u, v } => {
            let index = bank
                .info
                .names
                .iter()
                .position(|name| name == image)
                .ok_or_else(|| GalleryError::NotInBank(image.clone()))?;
            let patch = bank
                .patch_at(index, *u, *v)
                .ok_or(GalleryError::OutsideImage)?;
            let k = GALLERY_PAGE;
            let feature = bank.feature(patch);
            match search_index {
                Some(index) => (index.nearest(bank, &feature, k), None),
                None => (bank.nearest(&feature, k), None),
            }
        }
        GalleryQuery::Cluster {
            cluster,
            outliers,
            offset,
        } => {
            if centroids.is_empty() {
                return Err(GalleryError::NoCentroids);
            }
            let order = if *outliers {
                MemberOrder::Outliers
            } else {
                MemberOrder::Typical
            };
            let (members, total) =
                bank.cluster_members(centroids, *cluster, order, *offset, GALLERY_PAGE);
            (members, Some(total))
        }
    };
    let grid = bank.info.grid.max(1) as f32;
    let hits = neighbours
        .into_iter()
        .map(|neighbour| {
            let (image, x, y) = bank.location(neighbour.patch);
            let (cluster, _) = if centroids.is_empty() {
                (0, 0.0)
            } else {
                bank.assign(neighbour.patch, centroids)
            };
            GalleryHit {
                image: bank.info.names.get(image).cloned().unwrap_or_default(),
                uv_min: [x as f32 / grid, y as f32 / grid],
                uv_size: 1.0 / grid,
                similarity: neighbour.similarity,
                cluster,
            }
        })
        .collect();
    Ok(GalleryResult {
        query: query.clone(),
        hits,
        total,
        milliseconds: started.elapsed().as_secs_f64() * 1000.0,
        bank_size: bank.len(),
        index_probes: search_index
            .filter(|_| matches!(query, GalleryQuery::Pixel { .. }))
            .map(|index| (index.probes(), index.lists())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bank::tests::info;

    /// Two images of 2 x 2 patches in 2-D: patches 0 and 5 point the same way.
    fn small_bank() -> FeatureBank {
        let features = [
            1.0, 0.0, 0.0, 1.0, 0.7, 0.7, -1.0, 0.0, //
            0.0, -1.0, 1.0, 0.01, 0.6, 0.8, -0.7, 0.7,
        ];
        FeatureBank::from_features(info(2, 2, 2), &features).unwrap()
    }

    #[test]
    fn a_pixel_query_finds_its_patch_first_and_says_where_each_hit_lies() {
        let bank = small_bank();
        let query = GalleryQuery::Pixel {
            image: "dir/image-0.png".into(),
            u: 0.1,
            v: 0.1,
        };
        let result = answer(&bank, None, &query, &[]).unwrap();
        assert_eq!(result.hits.len(), GALLERY_PAGE.min(bank.len()));
        assert_eq!(result.hits[0].image, "dir/image-0.png");
        assert_eq!(result.hits[0].uv_min, [0.0, 0.0]);
        assert!((result.hits[0].similarity - 1.0).abs() < 1e-3);
        // Patch 5 (image 1, column 1, row 0) is the next best.
        assert_eq!(result.hits[1].image, "dir/image-1.png");
        assert_eq!(result.hits[1].uv_min, [0.5, 0.0]);
        assert_eq!(result.hits[1].uv_size, 0.5);
        assert_eq!(result.bank_size, 8);
    }

    #[test]
    fn questions_without_an_answer_are_typed_errors() {
        let bank = small_bank();
        let unknown = GalleryQuery::Pixel {
            image: "elsewhere.png".into(),
            u: 0.5,
            v: 0.5,
        };
        assert_eq!(
            answer(&bank, None, &unknown, &[]).unwrap_err(),
            GalleryError::NotInBank("elsewhere.png".into())
        );
        let cluster = GalleryQuery::Cluster {
            cluster: 0,
            outliers: false,
            offset: 0,
        };
        assert_eq!(
            answer(&bank, None, &cluster, &[]).unwrap_err(),
            GalleryError::NoCentroids
        );
        let centroids = [1.0, 0.0, -1.0, 0.0];
        let members = answer(&bank, None, &cluster, &centroids).unwrap();
        assert!(members.hits.iter().all(|hit| hit.cluster == 0));
        assert_eq!(members.total, Some(members.hits.len()));
    }
}
