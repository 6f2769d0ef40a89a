//! The crash battery, long: SIGKILL the real agent again and again at random
//! moments (mid-commit, mid-send, mid-reload) under a steady QoS 1 stream, restart
//! it on the same store each time, then count what arrived upstream.
//!
//! ```sh
//! cargo bench -p ferry-agent --bench crash_battery -- [--kills N] [--seed N] [--backend redb|sled]
//! ```
//!
//! Prints kills, readings published (acknowledged by the broker to the publisher),
//! lost (never arrived), resends (same `source` + `id` again, which receivers drop),
//! readings that arrived under two different ids, and ids that named two different
//! readings. The test `restart::thirty_kills_at_random_moments_lose_no_acknowledged_reading`
//! runs 30 kills in CI and requires 0 lost and 0 readings under two ids.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::time::Duration;

fn main() {
    let mut kills = 200;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut backend = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--backend" => backend = it.next(),
            "--kills" => kills = it.next().and_then(|v| v.parse().ok()).unwrap_or(kills),
            "--seed" => seed = it.next().and_then(|v| v.parse().ok()).unwrap_or(seed),
            _ => {}
        }
    }
    let b = support::run_battery_on(backend.as_deref(), kills, seed, Duration::from_secs(600));
    println!(
        "crash battery: SIGKILL at random moments under QoS 1 load (seed {})",
        b.seed
    );
    println!("kills                         {}", b.kills);
    println!("readings published            {}", b.published);
    println!("lost                          {}", b.lost);
    println!("resends (same source + id)    {}", b.resends);
    println!("readings with two ids         {}", b.two_ids);
    println!("ids naming two readings       {}", b.id_reused);
}
