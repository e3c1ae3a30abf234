//! The physical bound of onboarding: how long this machine needs just to
//! generate N DKIM keys with `mailauth_operator::dkim::generate`, on all
//! cores (one thread per core, pulling from a shared counter).
//!
//! ```text
//! cargo bench --bench keygen -- --count 1000 --algorithm rsa [--threads 2]
//! ```
//!
//! Prints `key value` lines (`keygen_seconds`, `keys_per_second`, ...) for
//! tests/bench/bench.sh to collect.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use mailauth_operator::api::KeyAlgorithm;
use mailauth_operator::dkim::{NewKey, generate};

fn main() {
    let mut count: usize = 1000;
    let mut algorithm = KeyAlgorithm::Rsa;
    let mut size = Some(2048);
    let mut threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| die(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--count" => count = value().parse().unwrap_or_else(|_| die("--count: a number")),
            "--threads" => {
                threads = value()
                    .parse()
                    .unwrap_or_else(|_| die("--threads: a number"))
            }
            "--algorithm" => match value().to_ascii_lowercase().as_str() {
                "rsa" => {
                    algorithm = KeyAlgorithm::Rsa;
                    size = Some(2048);
                }
                "ed25519" => {
                    algorithm = KeyAlgorithm::Ed25519;
                    size = None;
                }
                other => die(&format!("--algorithm: rsa or ed25519, not {other}")),
            },
            // `cargo bench` passes --bench to every bench binary.
            "--bench" => {}
            other => die(&format!("unknown argument {other}")),
        }
    }
    let threads = threads.max(1);

    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let request = NewKey {
                        selector: format!("bench{i}"),
                        algorithm,
                        size,
                        generation: 1,
                    };
                    let key = generate(&request)
                        .unwrap_or_else(|err| die(&format!("generating key {i}: {err}")));
                    std::hint::black_box(key);
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let cpu = own_cpu_seconds();
    println!("keygen_algorithm {algorithm:?}");
    println!("keygen_count {count}");
    println!("keygen_threads {threads}");
    println!("keygen_seconds {seconds:.3}");
    println!("keygen_keys_per_second {:.1}", count as f64 / seconds);
    println!("keygen_cpu_seconds {cpu:.2}");
    println!("keygen_cpu_ms_per_key {:.2}", cpu * 1000.0 / count as f64);
    println!(
        "keygen_ms_per_key_per_thread {:.2}",
        seconds * 1000.0 * threads as f64 / count as f64
    );
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat.
fn own_cpu_seconds() -> f64 {
    let ticks = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let fields: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    fields.iter().sum::<f64>() / ticks
}

fn die(message: &str) -> ! {
    eprintln!("keygen bench: {message}");
    std::process::exit(2);
}
