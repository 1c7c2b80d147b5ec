//! The test harness that runs a list of [`Case`]s against one engine: each case is one
//! test of the binary, reported as passed, failed, or ignored with its reason.

use std::future::Future;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use libtest_mimic::{Arguments, Completion, Failed, Trial};

use super::{engines_required, random_id, Case, Harness};
use crate::{Capabilities, OwnershipLabels};

/// Runs `cases` on the engine `connect` reaches, as the `main` of a test binary with
/// `harness = false`; it takes libtest's arguments (filters, `--list`,
/// `--test-threads`, …) and prints libtest's report, so `cargo test` counts its tests.
///
/// `connect` runs once, when the first test that is not filtered out starts, on the
/// runtime that runs every test. When it fails, every test is ignored with its reason,
/// or fails when engines are required ([`engines_required`]: `CI` is set). A test whose
/// [`Case::needs`] the backend lacks is ignored, naming the capability. After the tests,
/// [`Harness::leftovers`] must be empty.
///
/// ```text
/// fn main() -> std::process::ExitCode {
///     backend_core::conformance::main("Docker", common::connect, backend_core::conformance::cases())
/// }
/// ```
pub fn main<H, C, F>(engine: &'static str, connect: C, cases: Vec<Case>) -> ExitCode
where
    H: Harness + 'static,
    C: Fn() -> F + Send + Sync + 'static,
    F: Future<Output = Result<H, String>>,
{
    let args = Arguments::from_args();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("conformance: cannot start a tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let suite = Arc::new(Suite { engine, runtime, connect, ready: OnceLock::new() });
    let trials = cases
        .into_iter()
        .map(|case| {
            let suite = Arc::clone(&suite);
            Trial::ignorable_test(case.name, move || suite.run(case))
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let mut code = conclusion.exit_code();
    if let Some(Ok(ready)) = suite.ready.get() {
        let left = suite.runtime.block_on(ready.harness.leftovers());
        if !left.is_empty() {
            eprintln!("conformance: the tests left behind on {engine}: {left:?}");
            code = ExitCode::FAILURE;
        }
    }
    // The harness goes on the runtime: its fixtures may need one to drop.
    match Arc::try_unwrap(suite) {
        Ok(Suite { runtime, ready, .. }) => runtime.block_on(async move { drop(ready) }),
        Err(suite) => std::mem::forget(suite),
    }
    code
}

struct Suite<H, C> {
    engine: &'static str,
    runtime: tokio::runtime::Runtime,
    connect: C,
    ready: OnceLock<Result<Ready<H>, String>>,
}

struct Ready<H> {
    harness: H,
    backend: &'static str,
    caps: Capabilities,
}

impl<H, C, F> Suite<H, C>
where
    H: Harness + 'static,
    C: Fn() -> F,
    F: Future<Output = Result<H, String>>,
{
    fn run(&self, case: Case) -> Result<Completion, Failed> {
        let ready = self.ready.get_or_init(|| self.runtime.block_on(self.connect()));
        let ready = match ready {
            Ok(ready) => ready,
            Err(why) if engines_required() => {
                return Err(format!("{} is required (CI is set) but unusable: {why}", self.engine).into())
            }
            Err(why) => {
                return Ok(Completion::ignored_with(format!(
                    "{} unusable: {why}; set CI=1 to make this a failure",
                    self.engine
                )))
            }
        };
        if let Some(missing) = case.missing(&ready.caps) {
            return Ok(Completion::ignored_with(format!("the {} backend lacks {missing}", ready.backend)));
        }
        self.runtime.block_on((case.run)(&ready.harness));
        Ok(Completion::Completed)
    }

    async fn connect(&self) -> Result<Ready<H>, String> {
        let harness = (self.connect)().await?;
        let run = random_id();
        let owner = OwnershipLabels::new(format!("cp{run}"), format!("caps-{run}")).map_err(|e| e.to_string())?;
        let probe = harness.backend(owner).await;
        let (backend, caps) = (probe.name(), probe.capabilities());
        Ok(Ready { harness, backend, caps })
    }
}
