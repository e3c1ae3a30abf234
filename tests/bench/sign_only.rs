//! What DKIM signing alone costs, for tests/bench/relay.sh to set next to
//! the relay's CPU time per message: mail-auth's `DkimSigner` with the
//! relay's key, the relay's header list (From over-signed) and
//! relaxed/relaxed, over the same messages smtp_load submits, on one
//! thread.
//!
//! ```text
//! sign_only --key PKCS8_PEM_FILE [--messages N] [--size BYTES]
//!           [--domain D] [--selector S] [--from ADDRESS]
//! ```
//!
//! Prints one `key=value` line with the CPU time per message (this
//! thread's run time from /proc/thread-self/schedstat, in nanoseconds).

use std::time::Instant;

use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::{Canonicalization, DkimSigner};
use mailauth_operator::api::KeyAlgorithm;
use mailauth_operator::dkim::{PrivateKeyPem, signing_key_from_pem};
use mailauth_operator::relay::signing::SIGNED_HEADERS;

fn usage(problem: &str) -> ! {
    eprintln!(
        "sign_only: {problem}\nusage: sign_only --key PEM [--messages N] [--size BYTES] \
         [--domain D] [--selector S] [--from ADDRESS]"
    );
    std::process::exit(2)
}

/// The same message as tests/bench/smtp_load.rs builds (keep the two in
/// step): the headers a mail client writes, padded to about `size` bytes.
fn message(from: &str, id: usize, size: usize) -> String {
    let mut text = format!(
        "From: Alice <{from}>\r\nTo: Bob <bob@example.net>\r\nSubject: load test message {id}\r\n\
         Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <load-{id}@client.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    );
    const LINE: &str =
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n";
    while text.len() + LINE.len() <= size {
        text.push_str(LINE);
    }
    text
}

/// CPU time this thread has used, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .expect("reading /proc/thread-self/schedstat")
}

fn main() {
    let mut key_file = None;
    let mut messages = 1000usize;
    let mut size = 10 * 1024;
    let mut domain = "bench.test".to_string();
    let mut selector = "bench".to_string();
    let mut from = "alice@bench.test".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--key" => key_file = Some(value("--key")),
            "--messages" => {
                messages = value("--messages")
                    .parse()
                    .unwrap_or_else(|_| usage("--messages: not a number"))
            }
            "--size" => {
                size = value("--size")
                    .parse()
                    .unwrap_or_else(|_| usage("--size: not a number"))
            }
            "--domain" => domain = value("--domain"),
            "--selector" => selector = value("--selector"),
            "--from" => from = value("--from"),
            "--bench" => {}
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let key_file = key_file.unwrap_or_else(|| usage("--key is required"));
    let pem = std::fs::read_to_string(&key_file)
        .unwrap_or_else(|error| usage(&format!("reading {key_file}: {error}")));
    let key = signing_key_from_pem(KeyAlgorithm::Rsa, &PrivateKeyPem::new(pem))
        .unwrap_or_else(|error| usage(&format!("{key_file}: {error}")));
    let signer = DkimSigner::from_key(key)
        .domain(domain.as_str())
        .selector(selector.as_str())
        .headers(SIGNED_HEADERS)
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed);

    // The messages are built before timing starts, as the relay receives
    // them ready-made.
    let bodies: Vec<String> = (0..messages).map(|id| message(&from, id, size)).collect();
    let mut output = Vec::with_capacity(size + 1024);
    // Warm-up: the first signatures with a key cost more (lazily built
    // key material, cold caches); the relay has long paid for those.
    for body in bodies.iter().take(20) {
        std::hint::black_box(signer.sign(body.as_bytes()).expect("signing"));
    }
    let wall = Instant::now();
    let cpu_before = thread_cpu_ns();
    for body in &bodies {
        output.clear();
        let signature = signer.sign(body.as_bytes()).expect("signing");
        signature.write_header(&mut output);
        std::hint::black_box(&output);
    }
    let cpu_ns = thread_cpu_ns() - cpu_before;
    let wall = wall.elapsed();
    println!(
        "messages={messages} size={} cpu_ms_per_msg={:.4} wall_s={:.3}",
        bodies[0].len(),
        cpu_ns as f64 / 1e6 / messages as f64,
        wall.as_secs_f64()
    );
}
