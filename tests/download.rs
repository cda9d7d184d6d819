//! Downloads against a tiny local HTTP/1.1 server: success, corruption, resume, 404.

// Test servers and watchdogs make their own threads and channels.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use picie::download::{
    DownloadError, DownloadProgress, download_file, download_file_cancellable, partial_path_for,
};
use sha2::{Digest, Sha256};

const FILE_PATH: &str = "/weights.pth";

/// How the test server answers `Range` requests.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RangeSupport {
    /// 206 with the requested tail (or 416 past the end).
    Honour,
    /// 200 with the whole payload, as some servers do.
    Ignore,
}

/// One request the server saw.
#[derive(Debug, Clone)]
struct SeenRequest {
    path: String,
    range: Option<String>,
}

/// A one-file HTTP/1.1 server on 127.0.0.1 that stops when dropped.
struct TestServer {
    address: SocketAddr,
    requests: Arc<Mutex<Vec<SeenRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start(payload: Vec<u8>, range_support: RangeSupport) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        let address = listener.local_addr().expect("local address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let requests = Arc::clone(&requests);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("download-test-server".to_owned())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        if let Ok(stream) = stream {
                            // A broken connection only fails the request, not the server.
                            let _ = serve(stream, &payload, range_support, &requests);
                        }
                    }
                })
                .expect("spawn the server thread")
        };
        TestServer {
            address,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    fn requests(&self) -> Vec<SeenRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    stream: TcpStream,
    payload: &[u8],
    range_support: RangeSupport,
    requests: &Mutex<Vec<SeenRequest>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("range")
        {
            range = Some(value.trim().to_owned());
        }
    }
    requests.lock().unwrap().push(SeenRequest {
        path: path.clone(),
        range: range.clone(),
    });

    let start = range
        .as_deref()
        .filter(|_| range_support == RangeSupport::Honour)
        .and_then(|range| range.strip_prefix("bytes="))
        .and_then(|range| range.strip_suffix('-'))
        .and_then(|start| start.parse::<usize>().ok());
    let length = payload.len();
    let (status, extra_header, body): (&str, String, &[u8]) = if path != FILE_PATH {
        ("404 Not Found", String::new(), b"not found")
    } else {
        match start {
            None => ("200 OK", String::new(), payload),
            Some(start) if start >= length => (
                "416 Range Not Satisfiable",
                format!("Content-Range: bytes */{length}\r\n"),
                &[],
            ),
            Some(start) => (
                "206 Partial Content",
                format!("Content-Range: bytes {start}-{}/{length}\r\n", length - 1),
                &payload[start..],
            ),
        }
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\n{extra_header}\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    stream.flush()
}

/// 200 KB of deterministic, non-repeating bytes.
fn payload() -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..200 * 1024)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as u8
        })
        .collect()
}

fn sha256_prefix(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest
        .iter()
        .take(4)
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn no_partial_left(destination: &Path) -> bool {
    !partial_path_for(destination).expect("a file name").exists()
}

#[test]
fn a_good_file_downloads_and_reports_progress() {
    let payload = payload();
    let server = TestServer::start(payload.clone(), RangeSupport::Honour);
    let folder = tempfile::tempdir().unwrap();
    let destination = folder.path().join("nested").join("weights.pth");
    let mut reports: Vec<DownloadProgress> = Vec::new();
    // Upper case: the comparison ignores case.
    let prefix = sha256_prefix(&payload).to_ascii_uppercase();

    let path = download_file(
        &server.url(FILE_PATH),
        &destination,
        Some(&prefix),
        &mut |progress| reports.push(progress),
    )
    .expect("the download succeeds");

    assert_eq!(path, destination);
    assert_eq!(fs::read(&destination).unwrap(), payload);
    assert!(no_partial_left(&destination));
    let last = reports.last().expect("progress was reported");
    assert_eq!(last.downloaded, payload.len() as u64);
    assert_eq!(last.total, Some(payload.len() as u64));
    assert!(
        reports
            .windows(2)
            .all(|pair| pair[0].downloaded <= pair[1].downloaded)
    );

    // A second call finds the verified file and makes no request.
    let requests_before = server.requests().len();
    download_file(
        &server.url(FILE_PATH),
        &destination,
        Some(&prefix),
        &mut |_| {},
    )
    .expect("the cached file is accepted");
    assert_eq!(server.requests().len(), requests_before);
}

#[test]
fn a_corrupted_file_is_rejected_and_removed() {
    let payload = payload();
    let mut corrupted = payload.clone();
    corrupted[1234] ^= 0xff;
    let server = TestServer::start(corrupted, RangeSupport::Honour);
    let folder = tempfile::tempdir().unwrap();
    let destination = folder.path().join("weights.pth");
    let prefix = sha256_prefix(&payload);

    let error = download_file(
        &server.url(FILE_PATH),
        &destination,
        Some(&prefix),
        &mut |_| {},
    )
    .expect_err("a hash mismatch is an error");

    assert!(
        matches!(&error, DownloadError::HashMismatch { expected, .. } if *expected == prefix),
        "unexpected error: {error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("mismatch"), "{message}");
    assert!(message.contains(&prefix), "{message}");
    assert!(message.contains(&server.url(FILE_PATH)), "{message}");
    assert!(!destination.exists());
    assert!(no_partial_left(&destination));
}

#[test]
fn a_cancelled_download_stops_with_a_clear_error_and_the_next_attempt_completes() {
    let payload = payload();
    let server = TestServer::start(payload.clone(), RangeSupport::Honour);
    let folder = tempfile::tempdir().unwrap();
    let destination = folder.path().join("weights.pth");
    let prefix = sha256_prefix(&payload);
    let cancel = AtomicBool::new(false);

    // The user presses Cancel as soon as the transfer starts.
    let error = download_file_cancellable(
        &server.url(FILE_PATH),
        &destination,
        Some(&prefix),
        &mut |_| cancel.store(true, Ordering::SeqCst),
        &cancel,
    )
    .expect_err("a cancelled download is an error");
    assert!(
        matches!(error, DownloadError::Cancelled { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("cancelled"), "{error}");
    assert!(
        !destination.exists(),
        "nothing half-written at the destination"
    );

    cancel.store(false, Ordering::SeqCst);
    download_file_cancellable(
        &server.url(FILE_PATH),
        &destination,
        Some(&prefix),
        &mut |_| {},
        &cancel,
    )
    .expect("trying again downloads the file");
    assert_eq!(fs::read(&destination).unwrap(), payload);
    assert!(no_partial_left(&destination));
}

#[test]
fn an_interrupted_download_resumes_with_a_range_request() {
    let payload = payload();
    let server = TestServer::start(payload.clone(), RangeSupport::Honour);
    let folder = tempfile::tempdir().unwrap();
    let destination = folder.path().join("weights.pth");
    let half = payload.len() / 2;
    fs::write(partial_path_for(&destination).unwrap(), &payload[..half]).unwrap();
    let mut first_report = None;

    download_file(
        &server.url(FILE_PATH),
        &destination,
        Some(&sha256_prefix(&payload)),
        &mut |progress| {
            first_report.get_or_insert(progress);
        },
    )
    .expect("the resumed download succeeds");

    let requests = server.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].path, FILE_PATH);
    assert_eq!(
        requests[0].range.as_deref(),
        Some(&*format!("bytes={half}-"))
    );
    assert_eq!(
        first_report.map(|report| report.downloaded),
        Some(half as u64)
    );
    assert_eq!(fs::read(&destination).unwrap(), payload);
    assert!(no_partial_left(&destination));
}

#[test]
fn a_server_that_ignores_ranges_restarts_from_zero() {
    let payload = payload();
    let server = TestServer::start(payload.clone(), RangeSupport::Ignore);
    let folder = tempfile::tempdir().unwrap();
    let destination = folder.path().join("weights.pth");
    // A partial file the server will not continue (here it does not even match).
    fs::write(partial_path_for(&destination).unwrap(), vec![0_u8; 1000]).unwrap();

    download_file(
        &server.url(FILE_PATH),
        &destination,
        Some(&sha256_prefix(&payload)),
        &mut |_| {},
    )
    .expect("the download restarts and succeeds");

    assert!(server.requests()[0].range.is_some());
    assert_eq!(fs::read(&destination).unwrap(), payload);
    assert!(no_partial_left(&destination));
}

#[test]
fn a_complete_partial_file_is_verified_after_416() {
    let payload = payload();
    let server = TestServer::start(payload.clone(), RangeSupport::Honour);
    let folder = tempfile::tempdir().unwrap();
    let destination = folder.path().join("weights.pth");
    fs::write(partial_path_for(&destination).unwrap(), &payload).unwrap();

    download_file(
        &server.url(FILE_PATH),
        &destination,
        Some(&sha256_prefix(&payload)),
        &mut |_| {},
    )
    .expect("the complete partial file is accepted");

    assert_eq!(server.requests().len(), 1);
    assert_eq!(fs::read(&destination).unwrap(), payload);
    assert!(no_partial_left(&destination));
}

#[test]
fn a_missing_file_is_an_error_and_saves_nothing() {
    let server = TestServer::start(payload(), RangeSupport::Honour);
    let folder = tempfile::tempdir().unwrap();
    let destination = folder.path().join("weights.pth");
    let url = server.url("/missing.pth");

    let error =
        download_file(&url, &destination, None, &mut |_| {}).expect_err("a 404 is an error");

    assert!(
        matches!(error, DownloadError::HttpStatus { status: 404, .. }),
        "unexpected error: {error:?}"
    );
    assert!(error.to_string().contains(&url));
    assert!(!destination.exists());
    assert!(no_partial_left(&destination));
    assert_eq!(fs::read_dir(folder.path()).unwrap().count(), 0);
}
