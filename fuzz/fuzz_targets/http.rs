//! Arbitrary bytes sent as one HTTP/1.1 connection to a real `kiln serve` (hyper, the routes,
//! authorization, CORS, the request fields, chat templates, tools and `response_format`
//! constraints, generation on the default model), started once in this process with a small
//! context so that any accepted request finishes quickly. Every answer must be a well-formed
//! status line (HTTP/1.1, or HTTP/1.0 to a 1.0 request) that is not a 500, and the server must
//! keep running: a panic in any of its threads aborts the fuzzer.
#![no_main]

#[path = "common/model.rs"]
mod model;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;

/// How long one connection may take: the longest accepted request generates a full (small)
/// context on one thread.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts the server on a free loopback port and waits until `/health` answers.
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let model = model::default_model();
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let args = [
            "kiln".to_owned(),
            "serve".into(),
            model.display().to_string(),
            "--port".into(),
            addr.port().to_string(),
            "--ctx-size".into(),
            "48".into(),
            "-n".into(),
            "4".into(),
            "--threads".into(),
            "1".into(),
            "--parallel".into(),
            "2".into(),
            "--max-queue".into(),
            "2".into(),
            "--cors-origin".into(),
            "https://app.example".into(),
        ];
        std::thread::spawn(move || {
            let code = kiln_cli::main(args);
            panic!("kiln serve stopped ({code:?})");
        });
        let start = Instant::now();
        while exchange(addr, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .is_none_or(|a| !a.starts_with(b"HTTP/1.1 200"))
        {
            assert!(start.elapsed() < Duration::from_secs(120), "kiln serve did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        addr
    })
}

/// Sends `request`, closes the sending side and reads the whole answer.
fn exchange(addr: SocketAddr, request: &[u8]) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).ok()?;
    // The server may answer and close before reading everything (a refused body): not an error.
    let _ = stream.write_all(request);
    let _ = stream.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => Some(answer),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(answer),
        Err(e) => panic!("reading the answer: {e}"),
    }
}

fuzz_target!(|bytes: &[u8]| {
    let addr = server();
    let answer = exchange(addr, bytes).expect("connecting to kiln serve");
    if answer.is_empty() {
        return;
    }
    // hyper answers an HTTP/1.0 request in HTTP/1.0.
    let status = [&b"HTTP/1.1 "[..], b"HTTP/1.0 "]
        .iter()
        .find_map(|v| answer.strip_prefix(*v))
        .unwrap_or_else(|| {
            panic!(
                "not an HTTP answer: {:?}",
                String::from_utf8_lossy(&answer[..answer.len().min(200)])
            )
        });
    assert!(
        !status.starts_with(b"500"),
        "internal error: {}",
        String::from_utf8_lossy(&answer)
    );
});
