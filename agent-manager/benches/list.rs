//! Time of listing agents with 2,000 of them on the mock engine: the whole list (what
//! `GET /v1/agents` answered before it had pages), a default page of 500, and a page of
//! 50 from the first and from the last cursor (a page costs its size, wherever it is).
//!
//! `cargo xtask bench` runs it.

#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn list(c: &mut Criterion) {
    const AGENTS: usize = 2_000;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let (fx, last) = rt.block_on(async {
        let fx = common::Fixture::new().await;
        fx.spawn_many(AGENTS).await;
        // The cursor of the last page of 50.
        let mut cursor = None;
        let mut last = None;
        loop {
            let (_, next) = fx.manager.list_page(None, cursor.as_ref(), 50).await.expect("page");
            match next {
                Some(next) => {
                    last = Some(next.clone());
                    cursor = Some(next);
                }
                None => break,
            }
        }
        (fx, last)
    });
    let mut group = c.benchmark_group("list");
    group.sample_size(20);
    group.bench_with_input(BenchmarkId::new("all", AGENTS), &AGENTS, |b, _| {
        b.to_async(&rt).iter(|| async { assert_eq!(fx.manager.list(None).await.expect("list").len(), AGENTS) });
    });
    for (name, limit, cursor) in [("page_500", 500, None), ("page_50_first", 50, None), ("page_50_last", 50, last)] {
        group.bench_with_input(BenchmarkId::new(name, AGENTS), &AGENTS, |b, _| {
            b.to_async(&rt).iter(|| async {
                let (page, _) = fx.manager.list_page(None, cursor.as_ref(), limit).await.expect("page");
                assert_eq!(page.len(), limit);
            });
        });
    }
    group.finish();
}

criterion_group!(benches, list);
criterion_main!(benches);
