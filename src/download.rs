//! Downloads of pretrained backbone weights, resumable and verified by SHA-256.
//!
//! The app can fetch torchvision's ImageNet weights for its two backbones (see
//! [`known_weights`]) into a per-user cache folder ([`weights_cache_dir`]). Downloads stream
//! to a partial file beside the destination (`<name>.part`), resume from it with an HTTP
//! `Range` request when a previous download was interrupted, check the SHA-256 of the whole
//! file and only then rename it into place, so the destination is either absent or complete
//! and verified.
//!
//! One concern, in one file: fetching weights, resumable and verified (about 730 lines), and
//! its tests.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Environment variable that overrides the cache folder; weights go to its `weights` subfolder.
pub const CACHE_DIR_ENV: &str = "PICIE_CACHE_DIR";

/// How long to wait for a connection to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the server to answer a request with its headers.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a single read from the network may stall before the download is abandoned.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Size of the buffer the body is streamed through.
const CHUNK_SIZE: usize = 64 * 1024;
/// Progress is reported at least every this many bytes.
const PROGRESS_STEP: u64 = 256 * 1024;
/// What to tell the user when a download cannot be completed.
const MANUAL_HINT: &str = "or download the file yourself and pass --weights PATH";

/// A pretrained weight file the app knows how to download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownWeights {
    /// The file name, following torchvision's `<name>-<sha256 prefix>.pth` convention.
    pub file_name: &'static str,
    /// Where the file is downloaded from.
    pub url: &'static str,
}

impl KnownWeights {
    /// The prefix of the file's SHA-256 (lowercase hex) encoded in its name: the text after
    /// the last `-` and before `.pth`. `None` if the name does not follow that convention
    /// (then a download of it cannot be verified).
    pub fn sha256_prefix(&self) -> Option<&'static str> {
        let stem = self.file_name.strip_suffix(".pth")?;
        let (_, prefix) = stem.rsplit_once('-')?;
        is_hex_prefix(prefix).then_some(prefix)
    }
}

/// torchvision's ImageNet ResNet-18 weights.
pub static RESNET18_WEIGHTS: KnownWeights = KnownWeights {
    file_name: "resnet18-f37072fd.pth",
    url: "https://download.pytorch.org/models/resnet18-f37072fd.pth",
};

/// torchvision's ImageNet MobileNetV2 weights.
pub static MOBILENET_V2_WEIGHTS: KnownWeights = KnownWeights {
    file_name: "mobilenet_v2-b0353104.pth",
    url: "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
};

/// The weights to download for a backbone: `"resnet18"` or `"mobilenet_v2"` (`None` for any
/// other name).
pub fn known_weights(backbone_name: &str) -> Option<&'static KnownWeights> {
    match backbone_name {
        "resnet18" => Some(&RESNET18_WEIGHTS),
        "mobilenet_v2" => Some(&MOBILENET_V2_WEIGHTS),
        _ => None,
    }
}

/// How far a download has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadProgress {
    /// Bytes of the file on disk so far, including any resumed part.
    pub downloaded: u64,
    /// The size of the whole file, when the server says.
    pub total: Option<u64>,
}

impl DownloadProgress {
    /// The completed fraction in `0.0..=1.0`, when the total size is known.
    pub fn fraction(&self) -> Option<f32> {
        match self.total {
            Some(0) => Some(1.0),
            Some(total) => Some((self.downloaded as f64 / total as f64).clamp(0.0, 1.0) as f32),
            None => None,
        }
    }
}

/// Why a download failed. Every message names the URL or the file and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// Neither `PICIE_CACHE_DIR` nor a per-user cache folder is available.
    #[error(
        "could not determine a cache folder for downloaded weights; set {CACHE_DIR_ENV} to a \
         writable folder, {MANUAL_HINT}"
    )]
    NoCacheDir,

    /// The destination path has no file name (for example `/` or `..`).
    #[error(
        "cannot download to {path:?}: it does not name a file; choose a path such as weights/model.pth"
    )]
    InvalidDestination {
        /// The destination that was given.
        path: PathBuf,
    },

    /// The expected SHA-256 prefix is empty, too long or not hexadecimal.
    #[error(
        "invalid expected SHA-256 prefix {prefix:?} for {url}: it must be 1 to 64 hexadecimal digits"
    )]
    InvalidExpectedHash {
        /// The URL being downloaded.
        url: String,
        /// The prefix that was given.
        prefix: String,
    },

    /// The URL could not be understood.
    #[error("invalid download address {url:?}: {reason}; check the URL, {MANUAL_HINT}")]
    InvalidUrl {
        /// The URL that was given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The request could not be made or answered (no network, DNS failure, timeout, TLS...).
    #[error(
        "could not download {url}: {source}; check your network connection and try again, \
         {MANUAL_HINT}"
    )]
    Request {
        /// The URL being downloaded.
        url: String,
        /// The underlying HTTP client error.
        source: ureq::Error,
    },

    /// The server answered with an HTTP error status (404, 500, ...).
    #[error(
        "the server answered HTTP {status} for {url}; check the address and your network \
         connection, or try again later, {MANUAL_HINT}"
    )]
    HttpStatus {
        /// The URL being downloaded.
        url: String,
        /// The HTTP status code.
        status: u16,
    },

    /// The server's answer could not be used (for example a range that does not match).
    #[error(
        "unexpected answer from the server for {url}: {reason}; try again later, {MANUAL_HINT}"
    )]
    Protocol {
        /// The URL being downloaded.
        url: String,
        /// What was wrong.
        reason: String,
    },

    /// The connection broke while the file was being received.
    #[error(
        "the download of {url} was interrupted after {downloaded} bytes: {source}; check your \
         network connection and run again to resume from {partial:?}, {MANUAL_HINT}"
    )]
    Interrupted {
        /// The URL being downloaded.
        url: String,
        /// Bytes of the file on disk when the connection broke.
        downloaded: u64,
        /// The partial file kept for resuming.
        partial: PathBuf,
        /// The read error.
        source: io::Error,
    },

    /// The server closed the connection before sending the whole file.
    #[error(
        "the download of {url} stopped after {downloaded} of {expected} bytes; run again to \
         resume from {partial:?}, {MANUAL_HINT}"
    )]
    Incomplete {
        /// The URL being downloaded.
        url: String,
        /// Bytes received.
        downloaded: u64,
        /// Bytes the server announced.
        expected: u64,
        /// The partial file kept for resuming.
        partial: PathBuf,
    },

    /// The downloaded file's SHA-256 does not start with the expected prefix.
    #[error(
        "SHA-256 mismatch for {url} (saved as {file:?}): expected a hash starting with \
         {expected}, got {actual}; the corrupt download was deleted. Run again to download it \
         afresh; if this keeps happening the file on the server may have changed, {MANUAL_HINT}"
    )]
    HashMismatch {
        /// The URL the file came from.
        url: String,
        /// The file that would have been written.
        file: PathBuf,
        /// The expected hash prefix (lowercase).
        expected: String,
        /// The actual SHA-256 of the downloaded bytes (lowercase hex).
        actual: String,
    },

    /// Another download is writing the same partial file.
    #[error(
        "another download is already writing {partial:?}; wait for it to finish, or delete \
         the file if no other download is running"
    )]
    Busy {
        /// The partial file that is locked.
        partial: PathBuf,
    },

    /// The user cancelled the download; what arrived is kept for the next attempt to resume.
    #[error(
        "the download of {url} was cancelled; the part received is kept in {partial:?} for next time"
    )]
    Cancelled {
        /// The URL being downloaded.
        url: String,
        /// The partial file kept for resuming.
        partial: PathBuf,
    },

    /// A local file operation failed.
    #[error(
        "could not {action} {path:?}: {source}; check that the folder exists and is writable \
         and that the disk has free space"
    )]
    Io {
        /// What was being done ("create", "write", "read", ...).
        action: &'static str,
        /// The file or folder concerned.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

impl DownloadError {
    fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        DownloadError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The folder downloaded weights are cached in: `$PICIE_CACHE_DIR/weights` when that variable
/// is set (and not empty), otherwise `<user cache folder>/picie-explorer/weights`. The folder
/// is not created here.
pub fn weights_cache_dir() -> Result<PathBuf, DownloadError> {
    Ok(cache_root()?.join("weights"))
}

/// The application's cache folder: `$PICIE_CACHE_DIR` when that variable is set (and not
/// empty), otherwise `<user cache folder>/picie-explorer`. Not created here.
pub fn cache_root() -> Result<PathBuf, DownloadError> {
    cache_dir_from(std::env::var_os(CACHE_DIR_ENV), dirs::cache_dir())
}

fn cache_dir_from(
    override_dir: Option<std::ffi::OsString>,
    user_cache: Option<PathBuf>,
) -> Result<PathBuf, DownloadError> {
    match override_dir.filter(|dir| !dir.is_empty()) {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => user_cache
            .map(|dir| dir.join("picie-explorer"))
            .ok_or(DownloadError::NoCacheDir),
    }
}

/// The path of `weights` in the cache if it has already been downloaded. Files only reach the
/// cache after their hash has been verified, so a present file is complete.
pub fn cached_weights_path(weights: &KnownWeights) -> Option<PathBuf> {
    cached_weights_in(&cache_root().ok()?, weights)
}

/// `weights`' file under the cache folder `root` (in `root/weights`), if it is there.
pub fn cached_weights_in(root: &Path, weights: &KnownWeights) -> Option<PathBuf> {
    let path = root.join("weights").join(weights.file_name);
    path.is_file().then_some(path)
}

/// Downloads `weights` into [`weights_cache_dir`], verifying the SHA-256 prefix encoded in
/// its file name; returns the cached path at once if it is already there.
pub fn download_known_weights(
    weights: &KnownWeights,
    progress: &mut dyn FnMut(DownloadProgress),
) -> Result<PathBuf, DownloadError> {
    download_known_weights_in(&cache_root()?, weights, progress, &AtomicBool::new(false))
}

/// Downloads `weights` into the cache folder `root` (its `weights` subfolder, where
/// [`cached_weights_in`] looks), verifying its SHA-256 prefix; setting `cancel` stops it at
/// the next chunk with [`DownloadError::Cancelled`], keeping the part received.
pub fn download_known_weights_in(
    root: &Path,
    weights: &KnownWeights,
    progress: &mut dyn FnMut(DownloadProgress),
    cancel: &AtomicBool,
) -> Result<PathBuf, DownloadError> {
    let destination = root.join("weights").join(weights.file_name);
    download_file_cancellable(
        weights.url,
        &destination,
        weights.sha256_prefix(),
        progress,
        cancel,
    )
}

/// The partial file a download to `destination` is streamed into: `<name>.part` beside it.
/// It survives an interrupted download so that the next attempt can resume.
pub fn partial_path_for(destination: &Path) -> Option<PathBuf> {
    let name = destination.file_name()?;
    let mut partial = name.to_os_string();
    partial.push(".part");
    Some(destination.with_file_name(partial))
}

/// The SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, DownloadError> {
    let mut file = File::open(path).map_err(|error| DownloadError::io("open", path, error))?;
    sha256_reader(&mut file).map_err(|error| DownloadError::io("read", path, error))
}

/// Downloads `url` to `destination` and returns `destination`.
///
/// * If `destination` exists and its SHA-256 starts with `expected_sha256_prefix` (or no
///   prefix is given), nothing is downloaded.
/// * The body is streamed in chunks to `<destination>.part` (see [`partial_path_for`]); if that
///   file exists from an interrupted download, the download resumes from its end with an
///   HTTP `Range` request. A server that ignores the range (200) restarts the file from zero;
///   one that answers 416 means the partial file is already complete.
/// * `progress` is called when the transfer starts, regularly while it runs and at the end.
/// * When the transfer is complete the whole file is hashed and compared, case-insensitively,
///   with `expected_sha256_prefix`. On a mismatch the partial file is deleted and
///   [`DownloadError::HashMismatch`] is returned; otherwise the partial file is renamed into
///   place atomically.
///
/// HTTP error statuses are errors and never produce a file. A connection that breaks keeps
/// the partial file so that calling again resumes.
pub fn download_file(
    url: &str,
    destination: &Path,
    expected_sha256_prefix: Option<&str>,
    progress: &mut dyn FnMut(DownloadProgress),
) -> Result<PathBuf, DownloadError> {
    let never_cancelled = AtomicBool::new(false);
    download_file_cancellable(
        url,
        destination,
        expected_sha256_prefix,
        progress,
        &never_cancelled,
    )
}

/// [`download_file`] that stops with [`DownloadError::Cancelled`] at the next chunk once
/// `cancel` is set; the partial file is kept, so the next call resumes from it.
pub fn download_file_cancellable(
    url: &str,
    destination: &Path,
    expected_sha256_prefix: Option<&str>,
    progress: &mut dyn FnMut(DownloadProgress),
    cancel: &AtomicBool,
) -> Result<PathBuf, DownloadError> {
    let expected = match expected_sha256_prefix {
        Some(prefix) if is_hex_prefix(prefix) => Some(prefix.to_ascii_lowercase()),
        Some(prefix) => {
            return Err(DownloadError::InvalidExpectedHash {
                url: url.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        None => None,
    };
    let partial =
        partial_path_for(destination).ok_or_else(|| DownloadError::InvalidDestination {
            path: destination.to_path_buf(),
        })?;

    if destination.is_file() {
        match &expected {
            None => return Ok(destination.to_path_buf()),
            Some(expected) => {
                if sha256_file(destination)?.starts_with(expected.as_str()) {
                    return Ok(destination.to_path_buf());
                }
                // A stale or damaged file: download again and replace it.
            }
        }
    }

    if let Some(parent) = destination
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        fs::create_dir_all(parent).map_err(|error| DownloadError::io("create", parent, error))?;
    }

    let mut file = open_locked_partial(&partial)?;
    let transfer = fetch_into(url, &partial, &mut file, progress, cancel);
    let result = transfer.and_then(|()| {
        file.seek(SeekFrom::Start(0))
            .and_then(|_| sha256_reader(&mut file))
            .map_err(|error| DownloadError::io("read", &partial, error))
    });
    // Closing the file releases the lock; Windows also needs it closed to rename or delete it.
    drop(file);
    let actual = match result {
        Ok(actual) => actual,
        Err(error) => {
            // Keep a partial file only if it holds something to resume from.
            if fs::metadata(&partial).is_ok_and(|metadata| metadata.len() == 0) {
                let _ = fs::remove_file(&partial);
            }
            return Err(error);
        }
    };

    if let Some(expected) = expected
        && !actual.starts_with(&expected)
    {
        let _ = fs::remove_file(&partial);
        return Err(DownloadError::HashMismatch {
            url: url.to_owned(),
            file: destination.to_path_buf(),
            expected,
            actual,
        });
    }
    fs::rename(&partial, destination)
        .map_err(|error| DownloadError::io("move the finished download to", destination, error))?;
    Ok(destination.to_path_buf())
}

/// Opens (creating if needed) the partial file for reading and appending, and locks it so
/// that two downloads cannot write the same file.
fn open_locked_partial(partial: &Path) -> Result<File, DownloadError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(partial)
        .map_err(|error| DownloadError::io("create", partial, error))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(DownloadError::Busy {
            partial: partial.to_path_buf(),
        }),
        // Some file systems cannot lock; downloading without the lock is still fine.
        Err(fs::TryLockError::Error(error)) if error.kind() == io::ErrorKind::Unsupported => {
            Ok(file)
        }
        Err(fs::TryLockError::Error(error)) => Err(DownloadError::io("lock", partial, error)),
    }
}

/// Makes `file` hold the whole body of `url`, resuming from its current length.
fn fetch_into(
    url: &str,
    partial: &Path,
    file: &mut File,
    progress: &mut dyn FnMut(DownloadProgress),
    cancel: &AtomicBool,
) -> Result<(), DownloadError> {
    let agent = agent();
    let mut resume_from = file
        .metadata()
        .map_err(|error| DownloadError::io("read", partial, error))?
        .len();

    // At most one restart from zero, when the server cannot continue the partial file.
    for attempt in 0..2 {
        let restart_allowed = attempt == 0;
        let mut request = agent.get(url);
        if resume_from > 0 {
            request = request.header("Range", format!("bytes={resume_from}-"));
        }
        let response = request.call().map_err(|error| request_error(url, error))?;
        let status = response.status().as_u16();
        let content_range = response
            .headers()
            .get("content-range")
            .and_then(|value| value.to_str().ok())
            .map(parse_content_range);

        match status {
            206 => {
                let Some(Some(range)) = content_range else {
                    return Err(DownloadError::Protocol {
                        url: url.to_owned(),
                        reason: "a partial answer (206) without a valid Content-Range".to_owned(),
                    });
                };
                if range.start != Some(resume_from) {
                    if restart_allowed && resume_from > 0 {
                        truncate(file, partial)?;
                        resume_from = 0;
                        continue;
                    }
                    return Err(DownloadError::Protocol {
                        url: url.to_owned(),
                        reason: format!(
                            "asked for bytes from {resume_from} but received a different range"
                        ),
                    });
                }
                let total = range.total.or_else(|| {
                    response
                        .body()
                        .content_length()
                        .map(|length| resume_from + length)
                });
                file.seek(SeekFrom::Start(resume_from))
                    .map_err(|error| DownloadError::io("write", partial, error))?;
                return stream_body(
                    url,
                    partial,
                    file,
                    response,
                    (resume_from, total),
                    progress,
                    cancel,
                );
            }
            200 | 203 => {
                if resume_from > 0 {
                    // The server ignored the range: it sends the whole file again.
                    truncate(file, partial)?;
                }
                let total = response.body().content_length();
                return stream_body(url, partial, file, response, (0, total), progress, cancel);
            }
            416 if resume_from > 0 => {
                let total = content_range.flatten().and_then(|range| range.total);
                match total {
                    Some(total) if total != resume_from && restart_allowed => {
                        // The partial file does not fit the file on the server: start over.
                        truncate(file, partial)?;
                        resume_from = 0;
                        continue;
                    }
                    _ => {
                        // Nothing left to fetch: the partial file is complete (it is verified
                        // by hash afterwards).
                        progress(DownloadProgress {
                            downloaded: resume_from,
                            total: Some(resume_from),
                        });
                        return Ok(());
                    }
                }
            }
            _ => {
                return Err(DownloadError::HttpStatus {
                    url: url.to_owned(),
                    status,
                });
            }
        }
    }
    Err(DownloadError::Protocol {
        url: url.to_owned(),
        reason: "the server could not continue the download even from the start".to_owned(),
    })
}

/// Streams the body of `response` to `file` (positioned at `start`, of `total` bytes when
/// known) in chunks, until the end or until `cancel` is set.
fn stream_body(
    url: &str,
    partial: &Path,
    file: &mut File,
    response: ureq::http::Response<ureq::Body>,
    (start, total): (u64, Option<u64>),
    progress: &mut dyn FnMut(DownloadProgress),
    cancel: &AtomicBool,
) -> Result<(), DownloadError> {
    let mut reader = response.into_body().into_reader();
    let mut buffer = vec![0_u8; CHUNK_SIZE];
    let mut downloaded = start;
    let mut last_reported = start;
    progress(DownloadProgress { downloaded, total });
    loop {
        if cancel.load(Ordering::Relaxed) {
            let _ = file.sync_data();
            return Err(DownloadError::Cancelled {
                url: url.to_owned(),
                partial: partial.to_path_buf(),
            });
        }
        let read = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                // Keep what arrived so that the next attempt resumes from it.
                let _ = file.sync_data();
                return Err(DownloadError::Interrupted {
                    url: url.to_owned(),
                    downloaded,
                    partial: partial.to_path_buf(),
                    source: error,
                });
            }
        };
        file.write_all(&buffer[..read])
            .map_err(|error| DownloadError::io("write", partial, error))?;
        downloaded += read as u64;
        if downloaded - last_reported >= PROGRESS_STEP {
            last_reported = downloaded;
            progress(DownloadProgress { downloaded, total });
        }
    }
    file.sync_all()
        .map_err(|error| DownloadError::io("write", partial, error))?;
    if last_reported != downloaded {
        progress(DownloadProgress { downloaded, total });
    }
    match total {
        Some(expected) if downloaded != expected => Err(DownloadError::Incomplete {
            url: url.to_owned(),
            downloaded,
            expected,
            partial: partial.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

fn truncate(file: &mut File, partial: &Path) -> Result<(), DownloadError> {
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)).map(|_| ()))
        .map_err(|error| DownloadError::io("truncate", partial, error))
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .user_agent(concat!("picie-explorer/", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_response(Some(RESPONSE_TIMEOUT))
        .timeout_per_read(Some(READ_TIMEOUT))
        .build()
        .new_agent()
}

fn request_error(url: &str, error: ureq::Error) -> DownloadError {
    match error {
        ureq::Error::BadUri(reason) => DownloadError::InvalidUrl {
            url: url.to_owned(),
            reason,
        },
        source => DownloadError::Request {
            url: url.to_owned(),
            source,
        },
    }
}

/// A parsed `Content-Range` header: `bytes START-END/TOTAL` or `bytes */TOTAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ContentRange {
    /// First byte of the range; `None` for `bytes */TOTAL`.
    start: Option<u64>,
    /// Size of the whole file; `None` when the server sends `*`.
    total: Option<u64>,
}

fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        total => Some(total.parse().ok()?),
    };
    let start = match range.trim() {
        "*" => None,
        range => {
            let (start, end) = range.split_once('-')?;
            let start: u64 = start.trim().parse().ok()?;
            let end: u64 = end.trim().parse().ok()?;
            if end < start {
                return None;
            }
            Some(start)
        }
    };
    Some(ContentRange { start, total })
}

fn is_hex_prefix(prefix: &str) -> bool {
    !prefix.is_empty() && prefix.len() <= 64 && prefix.bytes().all(|byte| byte.is_ascii_hexdigit())
}

fn sha256_reader(reader: &mut impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0_u8; CHUNK_SIZE];
    loop {
        match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => hasher.update(&buffer[..read]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_names_carry_their_hash_prefixes() {
        let resnet = known_weights("resnet18").expect("resnet18 is known");
        assert_eq!(resnet.sha256_prefix(), Some("f37072fd"));
        assert!(resnet.url.ends_with(resnet.file_name));
        let mobilenet = known_weights("mobilenet_v2").expect("mobilenet_v2 is known");
        assert_eq!(mobilenet.sha256_prefix(), Some("b0353104"));
        assert!(mobilenet.url.ends_with(mobilenet.file_name));
        assert!(known_weights("vgg16").is_none());
        let unverifiable = KnownWeights {
            file_name: "model.pth",
            url: "https://example.com/model.pth",
        };
        assert_eq!(unverifiable.sha256_prefix(), None);
    }

    #[test]
    fn cache_dir_prefers_the_environment_override() {
        let from_env = cache_dir_from(Some("/tmp/picie".into()), Some("/home/u/.cache".into()));
        assert_eq!(from_env.unwrap(), Path::new("/tmp/picie"));
        let from_user = cache_dir_from(Some("".into()), Some("/home/u/.cache".into()));
        assert_eq!(
            from_user.unwrap(),
            Path::new("/home/u/.cache/picie-explorer")
        );
        assert!(matches!(
            cache_dir_from(None, None),
            Err(DownloadError::NoCacheDir)
        ));
    }

    #[test]
    fn content_range_headers_parse() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some(ContentRange {
                start: Some(100),
                total: Some(200)
            })
        );
        assert_eq!(
            parse_content_range("bytes */200"),
            Some(ContentRange {
                start: None,
                total: Some(200)
            })
        );
        assert_eq!(
            parse_content_range("bytes 0-9/*"),
            Some(ContentRange {
                start: Some(0),
                total: None
            })
        );
        assert_eq!(parse_content_range("bytes 9-0/10"), None);
        assert_eq!(parse_content_range("items 0-9/10"), None);
    }

    #[test]
    fn partial_path_sits_beside_the_destination() {
        assert_eq!(
            partial_path_for(Path::new("cache/resnet18.pth")),
            Some(PathBuf::from("cache/resnet18.pth.part"))
        );
        assert_eq!(partial_path_for(Path::new("/")), None);
    }

    #[test]
    fn invalid_prefixes_are_rejected_before_any_request() {
        let folder = tempfile::tempdir().unwrap();
        let result = download_file(
            "http://127.0.0.1:9/never",
            &folder.path().join("x.bin"),
            Some("not-hex"),
            &mut |_| {},
        );
        assert!(matches!(
            result,
            Err(DownloadError::InvalidExpectedHash { .. })
        ));
        assert_eq!(fs::read_dir(folder.path()).unwrap().count(), 0);
    }

    #[test]
    fn progress_fraction() {
        let half = DownloadProgress {
            downloaded: 50,
            total: Some(100),
        };
        assert_eq!(half.fraction(), Some(0.5));
        let unknown = DownloadProgress {
            downloaded: 50,
            total: None,
        };
        assert_eq!(unknown.fraction(), None);
    }
}
