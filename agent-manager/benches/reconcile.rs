//! Time of one reconcile pass over N unchanged agents on the mock engine.
//!
//! `cargo xtask bench` runs it. A pass costs one backend snapshot (the agents are held in
//! memory); the test `an_unchanged_pass_costs_one_snapshot_and_no_per_agent_calls`
//! asserts the call count, this measures the time.

#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn reconcile(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let mut group = c.benchmark_group("reconcile");
    group.sample_size(20);
    for n in [10usize, 100, 1_000, 10_000] {
        let fx = rt.block_on(async {
            let fx = common::Fixture::new().await;
            fx.spawn_many(n).await;
            fx
        });
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("unchanged_agents", n), &n, |b, _| {
            b.to_async(&rt).iter(|| async {
                let report = fx.manager.reconcile().await.expect("pass");
                assert_eq!(report.changed, 0);
            });
        });
    }
    group.finish();
}

criterion_group!(benches, reconcile);
criterion_main!(benches);
