//! The `agentd` binary: the daemon (`agentd serve`) and its command-line client.

use std::path::PathBuf;

use agent_manager::{AgentStatus, Approval, ConversationEntry, Decision, Direction, NewAgent, Run};
use agentd::api::{self, AgentJson, EventJson};
use agentd::client::{self, Client};
use agentd::config::{self, Sources};
use agentd::output::OutputArgs;
use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use reqwest::Method;
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(name = "agentd", version, about = "Runs AI coding agents in containers and knows the truth about them.")]
struct Cli {
    /// The daemon's API [default: http://<server.listen>, http://127.0.0.1:7006].
    #[arg(long, env = "AGENTD_URL", global = true)]
    url: Option<String>,
    /// The API bearer token [default: server.token or server.token_file from the configuration, none].
    #[arg(long, env = "AGENTD_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// A configuration file, layered over /etc/agentd/agentd.toml and
    /// $XDG_CONFIG_HOME/agentd/agentd.toml [default: none, those two alone].
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Serve,
    /// Create and start an agent.
    Spawn(Box<SpawnArgs>),
    /// List live agents (running, pending or about to restart); -a lists all.
    Ls {
        /// Every agent, also stopped and failed ones.
        #[arg(short, long)]
        all: bool,
        /// Print JSON instead of a table (the same as -o json).
        #[arg(long, conflicts_with_all = ["output", "format"])]
        json: bool,
        /// Only agents with this status: pending, running, stopped or failed (implies -a) [default: any].
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show agents with their spec and runs, as JSON (an object for one name, an array for several).
    Inspect {
        /// Agent names (or ids), handled one after the other.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// Show env values instead of <masked> (needs a token, honoured from a loopback peer only).
        #[arg(long)]
        show_secrets: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List an agent's runs (container lifetimes), oldest first.
    Runs {
        /// Agent name (or id).
        name: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Print an agent's container output (stdout and stderr), as `docker logs` does.
    Logs {
        /// Agent name (or id).
        name: String,
        /// Keep printing new output as it is written, until the run ends.
        #[arg(short, long)]
        follow: bool,
        /// Like --follow, and go on across restarts (a `--- agentd: run N … started ---` line
        /// before each new run) until the agent ends for good.
        #[arg(long)]
        follow_restarts: bool,
        /// Only the last N lines [default: all].
        #[arg(short = 'n', long, value_name = "N")]
        tail: Option<usize>,
        /// Only output since a time: RFC 3339 (2026-12-01T19:00:00Z), Unix seconds, or a
        /// duration back from now (10m, 1h30m, 2d) [default: all].
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        /// Prefix each line with the engine's time for it (RFC 3339, UTC).
        #[arg(short = 't', long)]
        timestamps: bool,
    },
    /// Stop agents (their records and exits stay).
    Stop {
        /// Agent names (or ids), handled one after the other.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// Seconds between SIGTERM and SIGKILL, 0 to 3600 [default: the agent's grace, agents.stop_grace_secs].
        #[arg(short = 't', long = "time", visible_alias = "timeout", value_name = "SECS",
              value_parser = clap::value_parser!(u64).range(0..=3600))]
        time: Option<u64>,
    },
    /// Restart agents.
    Restart {
        /// Agent names (or ids), handled one after the other.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// Remove agents and their containers; a running one only with --force.
    Rm {
        /// Agent names (or ids), handled one after the other.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// Stop a running agent first instead of refusing to remove it.
        #[arg(short, long)]
        force: bool,
    },
    /// Print lifecycle events (new ones as they happen, or past ones with --since/--tail).
    ///
    /// Without --since or --tail, only new events, as they happen (as `docker events`).
    /// With either, those past events, then the command exits (with -f it goes on with new
    /// ones). Following ends with exit 1 and a message when the daemon goes away.
    Events {
        /// After the past events --since or --tail chose, keep printing new ones (without
        /// either flag, events always follows).
        #[arg(short, long)]
        follow: bool,
        /// Only this agent's events (name or id) [default: every agent's].
        #[arg(long)]
        agent: Option<String>,
        /// Past events from this time on: RFC 3339 (2026-12-01T18:00:00Z), Unix seconds
        /// (0 is every stored event), or an age such as 90s, 10m, 2h, 1d, 1h30m [default: none, only new events].
        #[arg(long, value_name = "TIME", value_parser = client::parse_since)]
        since: Option<time::OffsetDateTime>,
        /// The last N past events (with --since: the last N of those) [default: none, only new events].
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// One JSON object per line (the API's event JSON, keys sorted), no header (the same as -o json).
        #[arg(long, conflicts_with_all = ["output", "format"])]
        json: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Send a message to a claude-code agent and print its reply as it arrives; exits 0
    /// when the turn succeeds and 1 when its result is an error.
    Send {
        /// The agent's name (or id).
        name: String,
        /// The message.
        text: String,
        /// Only queue the message; do not wait for the reply.
        #[arg(long)]
        no_wait: bool,
    },
    /// Talk to a claude-code agent: a prompt with history, replies as they stream,
    /// approvals asked as `allow? [y/N]`; Ctrl-C interrupts the turn, Ctrl-D leaves.
    /// Without a terminal, one message per line of stdin.
    Chat {
        /// The agent's name (or id).
        name: String,
    },
    /// List tool-permission requests (pending ones by default).
    Approvals {
        /// Only this agent's (name or id) [default: every agent's].
        #[arg(long)]
        agent: Option<String>,
        /// Decided ones too.
        #[arg(short, long)]
        all: bool,
        /// Print JSON (the same as -o json).
        #[arg(long, conflicts_with_all = ["output", "format"])]
        json: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Allow pending tool-permission requests.
    Approve {
        /// Approval ids, as `agentd approvals` lists them.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
    /// Deny pending tool-permission requests.
    Deny {
        /// Approval ids, as `agentd approvals` lists them.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
        /// Why, told to the agent [default: none].
        #[arg(long)]
        message: Option<String>,
    },
    /// Print a claude-code agent's conversation.
    Conversation {
        /// The agent's name (or id).
        name: String,
        /// Keep printing new entries.
        #[arg(short, long)]
        follow: bool,
        /// Print each entry as a line of JSON (the same as -o json).
        #[arg(long, conflicts_with_all = ["output", "format"])]
        json: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Validate or print the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the client's version and the daemon's.
    ///
    /// The daemon's comes from its /healthz; exit 1 when the daemon cannot be asked.
    Version,
    /// Print a shell completion script.
    ///
    /// `agentd completion bash > /etc/bash_completion.d/agentd`,
    /// `agentd completion zsh > "${fpath[1]}/_agentd"`,
    /// `agentd completion fish > ~/.config/fish/completions/agentd.fish`.
    Completion {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), agentd's or a verb's.
    ///
    /// `agentd man > /usr/local/share/man/man1/agentd.1`, and a verb's with its flags:
    /// `agentd man spawn > /usr/local/share/man/man1/agentd-spawn.1`.
    Man {
        /// The verb whose page to print [default: none, agentd's own page].
        #[arg(value_name = "VERB")]
        verb: Option<String>,
    },
}

/// The verbs that do not talk to a daemon: the client's `--url` and `--token` are not
/// offered on them (not in their help, not completed, refused when given).
const LOCAL_VERBS: [&str; 4] = ["serve", "config", "completion", "man"];

/// The client flags, as `--url`, `--token`.
const CLIENT_FLAGS: [&str; 2] = ["url", "token"];

/// The command line's grammar: [`Cli`] with `--url` and `--token` taken off the verbs
/// that do not talk to a daemon. clap gives a global flag to every subcommand that does
/// not define one of its own id, so each of those verbs gets a hidden stand-in that
/// refuses any value (and reads no environment variable).
fn cli_command() -> clap::Command {
    let mut cmd = Cli::command();
    for verb in LOCAL_VERBS {
        cmd = cmd.mut_subcommand(verb, |mut sub| {
            for flag in CLIENT_FLAGS {
                let name = format!("agentd {verb}");
                sub = sub.arg(clap::Arg::new(flag).long(flag).global(true).hide(true).value_parser(
                    move |_: &str| -> Result<String, String> {
                        Err(format!("--{flag} is for the client verbs; {name} does not talk to a daemon"))
                    },
                ));
            }
            sub
        });
    }
    cmd
}

/// The grammar as completion scripts and the man page tell it: [`Cli`] with `--url` and
/// `--token` given to each client verb (and the top level) but not to the local verbs.
/// (The generators would show [`cli_command`]'s hidden stand-ins.)
fn documented_command() -> clap::Command {
    let mut cmd = Cli::command();
    for flag in CLIENT_FLAGS {
        cmd = cmd.mut_arg(flag, |arg| arg.global(false));
    }
    let flags: Vec<clap::Arg> =
        cmd.get_arguments().filter(|a| CLIENT_FLAGS.contains(&a.get_id().as_str())).cloned().collect();
    let verbs: Vec<String> = cmd
        .get_subcommands()
        .map(|sub| sub.get_name().to_owned())
        .filter(|verb| !LOCAL_VERBS.contains(&verb.as_str()))
        .collect();
    for verb in verbs {
        cmd = cmd.mut_subcommand(verb, |sub| sub.args(flags.iter().cloned()));
    }
    cmd
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration; exit 2 with the problems if it is invalid.
    Check,
    /// Print the effective configuration with each value's source (secrets redacted).
    Show,
}

#[derive(Debug, Args)]
struct SpawnArgs {
    /// The agent's name: 1 to 63 of a-z, 0-9 and '-'.
    name: String,
    /// claude-code or image [default: agents.kind, claude-code].
    #[arg(long)]
    kind: Option<String>,
    /// A local image [default: agents.image, agentd-claude:latest].
    #[arg(long)]
    image: Option<String>,
    /// How tool-permission requests are answered: ask, allow or deny [default: agents.approvals, ask].
    #[arg(long)]
    approvals: Option<String>,
    /// Claude Code's --permission-mode (default, acceptEdits, auto, bypassPermissions, manual, dontAsk, plan)
    /// [default: agents.permission_mode, the CLI's own].
    #[arg(long)]
    permission_mode: Option<String>,
    /// Claude Code's --max-budget-usd [default: agents.max_budget_usd, none].
    #[arg(long)]
    max_budget_usd: Option<f64>,
    /// Claude Code's --max-turns [default: agents.max_turns, none].
    #[arg(long)]
    max_turns: Option<u32>,
    /// Model requests the agent may start in any 60 s [default: model.requests_per_minute, no limit].
    #[arg(long)]
    requests_per_minute: Option<u32>,
    /// Model requests the agent may have in flight at once [default: model.max_concurrent_requests, no limit].
    #[arg(long)]
    max_concurrent_requests: Option<u32>,
    /// Output tokens the agent may use per UTC day [default: model.max_output_tokens_per_day, no limit].
    #[arg(long)]
    max_output_tokens_per_day: Option<u64>,
    /// Environment variable for the agent, repeatable; wins over forwarded ones [default: none].
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// A destination the agent may reach through agentd's egress proxy, repeatable: HOST
    /// (ports 443 and 80), HOST:PORT or *.DOMAIN[:PORT] [default: agents.egress_allow, none].
    #[arg(long = "egress-allow", value_name = "HOST[:PORT]")]
    egress_allow: Vec<String>,
    /// Allow the agent no destination through the egress proxy, whatever agents.egress_allow says.
    #[arg(long, conflicts_with = "egress_allow")]
    no_egress: bool,
    /// Memory limit in MiB, no swap, from 6 to 2^40 [default: agents.memory_mb, 2048].
    #[arg(long, value_parser = parse_memory_mb)]
    memory_mb: Option<u64>,
    /// CPU limit in cores, from 0.01 to the engine host's CPUs [default: agents.cpus, 2].
    #[arg(long, value_parser = parse_cpus)]
    cpus: Option<f64>,
    /// internet, isolated, none or host [default: agents.network; unset: isolated for claude-code, internet for image].
    #[arg(long)]
    network: Option<String>,
    /// never, on-failure or always [default: agents.restart, never].
    #[arg(long)]
    restart: Option<String>,
    /// Host directory mounted read-write at /workspace, the agent's working directory [default: none].
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Claude Code's --model [default: the CLI's own].
    #[arg(long)]
    model: Option<String>,
    /// First message of a claude-code agent's conversation [default: none].
    #[arg(long)]
    prompt: Option<String>,
    /// Program to run instead of the image's ENTRYPOINT (kind image); the words after `--`
    /// become its arguments, and the image's CMD is not used [default: the image's].
    #[arg(long, value_name = "PROGRAM")]
    entrypoint: Option<String>,
    /// Command to run instead of the image's ENTRYPOINT and CMD (kind image), after `--`;
    /// with --entrypoint, that program's arguments [default: the image's].
    #[arg(last = true)]
    command: Vec<String>,
}

/// `--memory-mb`: a number of MiB in the range agentd accepts.
fn parse_memory_mb(value: &str) -> Result<u64, String> {
    let mb: u64 = value.parse().map_err(|e| format!("{value:?} is not a whole number of MiB: {e}"))?;
    backend_core::rules::memory_mb(mb).map_err(|allowed| format!("{mb}: {allowed}"))?;
    Ok(mb)
}

/// `--cpus`: a number of cores in the range agentd accepts (the engine's CPUs are checked
/// by the daemon).
fn parse_cpus(value: &str) -> Result<f64, String> {
    let cpus: f64 = value.parse().map_err(|e| format!("{value:?} is not a number of cores: {e}"))?;
    backend_core::rules::cpus(cpus).map_err(|allowed| format!("{cpus}: {allowed}"))?;
    Ok(cpus)
}

fn main() {
    let matches = cli_command().get_matches();
    let local = matches.subcommand_name().is_some_and(|verb| LOCAL_VERBS.contains(&verb));
    if let Some(flag) = CLIENT_FLAGS
        .into_iter()
        .find(|flag| local && matches.value_source(flag) == Some(clap::parser::ValueSource::CommandLine))
    {
        let verb = matches.subcommand_name().unwrap_or_default();
        eprintln!("agentd: --{flag} is for the client verbs; agentd {verb} does not talk to a daemon");
        std::process::exit(2);
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentd: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(run(cli));
    std::process::exit(code);
}

async fn run(cli: Cli) -> i32 {
    let sources = Sources::standard(cli.config.clone());
    match cli.command {
        Command::Serve => {
            let config = match config::load(&sources) {
                Ok(config) => config,
                Err(e) => {
                    eprint!("agentd: {e}");
                    return 2;
                }
            };
            agentd::daemon::init_logging(&config);
            match agentd::daemon::serve(config).await {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "agentd failed.");
                    eprintln!("agentd: {e:#}");
                    1
                }
            }
        }
        Command::Config(ConfigCommand::Check) => match config::load(&sources) {
            Ok(_) => {
                println!("configuration is valid ({})", config::describe(cli.config.as_deref()));
                0
            }
            Err(e) => {
                eprint!("agentd: {e}");
                2
            }
        },
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut documented_command(), "agentd", &mut std::io::stdout());
            0
        }
        Command::Man { verb } => {
            let mut cmd = documented_command();
            cmd.build();
            let page = match &verb {
                None => clap_mangen::Man::new(cmd),
                Some(verb) => match cmd.find_subcommand(verb) {
                    Some(sub) => clap_mangen::Man::new(sub.clone().version(env!("CARGO_PKG_VERSION")))
                        .title(format!("agentd-{verb}")),
                    None => {
                        let verbs: Vec<&str> = cmd.get_subcommands().map(clap::Command::get_name).collect();
                        eprintln!("agentd: man {verb}: no such verb; one of: {}", verbs.join(", "));
                        return 2;
                    }
                },
            };
            match page.render(&mut std::io::stdout()) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("agentd: cannot write the manual page: {e}");
                    1
                }
            }
        }
        Command::Config(ConfigCommand::Show) => match config::show(&sources) {
            Ok(text) => {
                print!("{text}");
                0
            }
            Err(e) => {
                eprint!("agentd: {e}");
                2
            }
        },
        command => match client_command(cli.url, cli.token, &sources, command).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("agentd: {e:#}");
                1
            }
        },
    }
}

/// The configuration files the client read (or was told to read), for a warning.
fn config_files(sources: &Sources) -> String {
    let mut files: Vec<String> = [Some(&sources.system), sources.user.as_ref()]
        .into_iter()
        .flatten()
        .filter(|p| p.exists())
        .chain(sources.explicit.as_ref())
        .map(|p| p.display().to_string())
        .collect();
    files.push("AGENTD_* variables".to_owned());
    files.join(", ")
}

/// What [`for_each_name`] did: the values of the names that succeeded, and an error if
/// any failed.
struct Outcome<T> {
    done: Vec<T>,
    result: Result<()>,
}

/// Runs `each` for every name in turn, as docker does: one that fails is reported on
/// stderr with its name and the others still run. The result is that one name's error
/// when there is only one, and an error counting the failures (exit 1) when there are
/// several.
async fn for_each_name<T, F, Fut>(names: &[String], done_what: &str, mut each: F) -> Outcome<T>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut outcome = Outcome { done: Vec::new(), result: Ok(()) };
    let mut failed = 0;
    for name in names {
        match each(name.clone()).await {
            Ok(value) => outcome.done.push(value),
            Err(e) if names.len() == 1 => outcome.result = Err(e),
            Err(e) => {
                eprintln!("agentd: {name}: {e:#}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        outcome.result = Err(anyhow::anyhow!("{failed} of {} agents could not be {done_what}", names.len()));
    }
    outcome
}

/// A command-line value for one of the API's enumerations (`--network isolated`), read
/// as the API reads it.
fn choice<T: serde::de::DeserializeOwned>(flag: &str, value: Option<String>) -> Result<Option<T>> {
    value.map(|v| serde_json::from_value(Value::String(v.clone())).with_context(|| format!("{flag} {v:?}"))).transpose()
}

async fn client_command(url: Option<String>, token: Option<String>, sources: &Sources, command: Command) -> Result<()> {
    // The client reads the configuration only for the address and token; a broken file
    // must not stop it from talking to a daemon named on the command line, but it is
    // said, since its token is then not sent.
    let mut auth_hint = None;
    let config = match config::load(sources) {
        Ok(config) => Some(config),
        Err(e) => {
            let files = config_files(sources);
            eprint!(
                "agentd: warning: the configuration ({files}) could not be loaded, so its server.listen and \
                 server.token are not used: {e}"
            );
            auth_hint =
                Some(format!("the configuration ({files}) could not be loaded, so its server.token was not used"));
            None
        }
    };
    if let Some(c) = config.as_ref().filter(|c| token.is_none() && c.server.token.is_none()) {
        if let Some(path) = &c.server.token_file {
            if let Err(e) = std::fs::read_to_string(path) {
                eprintln!("agentd: warning: cannot read server.token_file {}: {e}; no token is sent", path.display());
                auth_hint = Some(format!("server.token_file {} could not be read: {e}", path.display()));
            }
        }
    }
    let url = url.unwrap_or_else(|| {
        let listen = config.as_ref().map_or_else(|| "127.0.0.1:7006".to_owned(), |c| c.server.listen.to_string());
        format!("http://{listen}")
    });
    let token = token.or_else(|| config.as_ref().and_then(|c| c.token()));
    let client = Client::new(&url, token)?.with_auth_hint(auth_hint);
    let agent_path = |name: &str| format!("/v1/agents/{}", client::encode(name));
    match command {
        Command::Spawn(args) => {
            let mut env = std::collections::BTreeMap::new();
            for pair in &args.env {
                let (k, v) = pair.split_once('=').with_context(|| format!("--env {pair:?}: expected K=V"))?;
                env.insert(k.to_owned(), v.to_owned());
            }
            let args = *args;
            let model_limits = agent_manager::ModelLimits {
                requests_per_minute: args.requests_per_minute,
                max_concurrent_requests: args.max_concurrent_requests,
                max_output_tokens_per_day: args.max_output_tokens_per_day,
            };
            let new = NewAgent {
                name: args.name,
                kind: choice("--kind", args.kind)?,
                image: args.image,
                entrypoint: args.entrypoint.map(|program| vec![program]),
                command: (!args.command.is_empty()).then_some(args.command),
                env,
                workdir: args.workdir,
                memory_mb: args.memory_mb,
                cpus: args.cpus,
                network: choice("--network", args.network)?,
                restart: choice("--restart", args.restart)?,
                model: args.model,
                prompt: args.prompt,
                approvals: choice("--approvals", args.approvals)?,
                permission_mode: args.permission_mode,
                max_turns: args.max_turns,
                max_budget_usd: args.max_budget_usd,
                model_limits: (!model_limits.is_empty()).then_some(model_limits),
                egress_allow: (args.no_egress || !args.egress_allow.is_empty()).then_some(args.egress_allow),
                ..NewAgent::default()
            };
            let agent: AgentJson = client.call_with(Method::POST, "/v1/agents", Some(&new)).await?;
            println!("{} {} ({}, session {})", agent.name, agent.status, agent.id, agent.session);
        }
        Command::Ls { all, json, status, output } => {
            let format = output.format(json)?;
            let all = all || status.is_some();
            // Every page, the largest the daemon gives.
            let query = api::ListQuery { status, limit: Some(agent_manager::MAX_AGENT_PAGE), cursor: None };
            let mut agents: Vec<AgentJson> = client.get_all_pages("/v1/agents", &query, "cursor").await?;
            if !all {
                agents.retain(client::is_live);
            }
            format.print_list(&agents, |wide| client::agents_table(&agents, wide), |a| a.name.clone())?;
        }
        Command::Inspect { names, show_secrets, output } => {
            let format = output.format(false)?;
            let query = api::AgentQuery { show_secrets };
            let outcome = for_each_name(&names, "inspected", |name| {
                let (client, query) = (&client, &query);
                async move {
                    let agent: AgentJson = client.get_query(&agent_path(&name), query).await?;
                    let runs: Vec<Run> = client.get(&format!("{}/runs", agent_path(&name))).await?;
                    Ok(client::AgentWithRuns { agent, runs })
                }
            })
            .await;
            let found = outcome.done;
            match format {
                // One object for one name, an array for several.
                agentd::output::Format::Json | agentd::output::Format::Table => {
                    let mut values = found.iter().map(client::printable).collect::<Result<Vec<Value>>>()?;
                    let printed =
                        if names.len() == 1 { values.pop().unwrap_or(Value::Null) } else { Value::Array(values) };
                    if names.len() > 1 || !printed.is_null() {
                        println!("{}", serde_json::to_string_pretty(&printed)?);
                    }
                }
                format => {
                    let agents: Vec<AgentJson> = found.iter().map(|f| f.agent.clone()).collect();
                    format.print_list(&found, |wide| client::agents_table(&agents, wide), |f| f.agent.name.clone())?;
                }
            }
            outcome.result?;
        }
        Command::Runs { name, output } => {
            let format = output.format(false)?;
            let runs: Vec<Run> = client.get(&format!("{}/runs", agent_path(&name))).await?;
            format.print_list(&runs, |wide| client::runs_table(&runs, wide), |r| r.id.to_string())?;
        }
        Command::Logs { name, follow, follow_restarts, tail, since, timestamps } => {
            let query = api::LogsQuery { tail, follow, follow_restarts, since, timestamps };
            let response = client.open_stream(&format!("{}/logs", agent_path(&name)), &query).await?;
            client::print_body(response).await?;
        }
        Command::Stop { names, time } => {
            // The API's `StopQuery`.
            let query = time.map_or_else(String::new, |secs| format!("?grace_secs={secs}"));
            for_each_name(&names, "stopped", |name| {
                let (client, query) = (&client, &query);
                async move {
                    let path = format!("{}/stop{query}", agent_path(&name));
                    let progress = client::Progress::start(client, "stopping", &name, time).await;
                    let agent = client.call::<AgentJson>(Method::POST, &path).await;
                    progress.done();
                    let agent = agent?;
                    println!("{} {} (exit {})", name, agent.status, client::exit_column(agent.exit.as_ref()));
                    Ok(())
                }
            })
            .await
            .result?;
        }
        Command::Restart { names } => {
            for_each_name(&names, "restarted", |name| {
                let client = &client;
                async move {
                    let progress = client::Progress::start(client, "restarting", &name, None).await;
                    let agent = client.call::<AgentJson>(Method::POST, &format!("{}/restart", agent_path(&name))).await;
                    progress.done();
                    let agent = agent?;
                    println!("{} {} (restarts {})", name, agent.status, agent.restarts);
                    Ok(())
                }
            })
            .await
            .result?;
        }
        Command::Rm { names, force } => {
            for_each_name(&names, "removed", |name| {
                let client = &client;
                async move {
                    if !force {
                        // Checked here, by the client: the API's DELETE stops a live agent.
                        let agent: AgentJson = client.get(&agent_path(&name)).await?;
                        let live = matches!(agent.status, AgentStatus::Running | AgentStatus::Pending);
                        if live || agent.next_restart_at.is_some() {
                            let what = if live { agent.status.to_string() } else { "about to restart".to_owned() };
                            bail!(
                                "agent {name} is {what}: stop it first (`agentd stop {name}`), or remove it anyway \
                                 with `agentd rm -f {name}`"
                            );
                        }
                    }
                    let progress = client::Progress::start(client, "removing", &name, None).await;
                    let removed = client.call::<()>(Method::DELETE, &agent_path(&name)).await;
                    progress.done();
                    removed?;
                    println!("{name} removed");
                    Ok(())
                }
            })
            .await
            .result?;
        }
        Command::Events { follow, agent, since, tail, json, output } => {
            // JSON is one line per event, so that a followed stream can be read line by line.
            let format = output.format(json)?;
            let past = since.is_some() || tail.is_some();
            // Subscribe before listing, so no event falls between the two.
            let stream = if follow || !past {
                Some(client.open_stream("/v1/events/stream", &api::StreamQuery { agent: agent.clone() }).await?)
            } else {
                None
            };
            let print = |event: &EventJson| -> Result<()> {
                let line = format.render_one(event, |wide| client::event_line(event, wide), |e| e.id.to_string())?;
                println!("{line}");
                Ok(())
            };
            if let Some(wide) = format.table() {
                println!("{}", client::events_header(wide));
            }
            let mut last = 0;
            if past {
                // The store answers by id; the time and the tail are chosen here, holding
                // no more than the tail.
                let mut kept = std::collections::VecDeque::new();
                loop {
                    let query = api::EventsQuery { agent: agent.clone(), since: Some(last), limit: Some(1000) };
                    let page: Vec<EventJson> = client.get_query("/v1/events", &query).await?;
                    // A page is short when it hits the daemon's byte budget: read on until
                    // one is empty.
                    let Some(end) = page.last() else { break };
                    last = end.id;
                    for event in page.into_iter().filter(|e| since.is_none_or(|since| e.at >= since)) {
                        match tail {
                            None => print(&event)?,
                            Some(n) => {
                                kept.push_back(event);
                                if kept.len() > n {
                                    kept.pop_front();
                                }
                            }
                        }
                    }
                }
                for event in &kept {
                    print(event)?;
                }
            }
            if let Some(stream) = stream {
                eprintln!("agentd: following new events from {url} (Ctrl-C to stop)");
                let mut failed = None;
                let followed = client
                    .follow_events(stream, |event| {
                        if event.id > last && failed.is_none() {
                            failed = print(&event).err();
                        }
                    })
                    .await;
                if let Some(e) = failed {
                    return Err(e);
                }
                let why = match followed {
                    Ok(()) => "the daemon ended the event stream".to_owned(),
                    Err(e) => format!("{e:#}"),
                };
                bail!("stopped following events: the daemon at {url} went away ({why}); is it stopping or restarting?");
            }
        }
        Command::Send { name, text, no_wait } => {
            let message = api::MessageRequest { text };
            let queued: api::MessageAccepted =
                client.call_with(Method::POST, &format!("{}/messages", agent_path(&name)), Some(&message)).await?;
            let (seq, uuid) = (queued.seq, queued.uuid);
            if no_wait {
                println!("message {seq} queued for {name}");
                return Ok(());
            }
            let after = api::ConversationQuery { after: Some(seq), limit: None };
            let stream = client.open_stream(&format!("{}/conversation/stream", agent_path(&name)), &after).await?;
            let mut result: Option<ConversationEntry> = None;
            let followed = client.follow_conversation(stream, |entry| {
                if entry.direction != Direction::FromAgent {
                    return true;
                }
                match entry.kind.as_str() {
                    "assistant" => {
                        if !entry.text.is_empty() {
                            println!("{}", entry.text);
                        }
                        true
                    }
                    "result" if client::ends_turn(&entry, uuid.as_deref()) => {
                        result = Some(entry);
                        false
                    }
                    _ => true,
                }
            });
            tokio::select! {
                followed = followed => { followed?; }
                status = client.until_agent_stops(&name) => bail!("agent {name} is {status}: the turn ended without a result"),
            }
            let result =
                result.context("the conversation stream ended before the turn's result (is the daemon stopping?)")?;
            // `data` is the agent's own line: the one part of an entry without a type here.
            if result.data["is_error"].as_bool() == Some(true) {
                // Claude Code ends a turn whose model request failed with subtype
                // `success` and `is_error`: the subtype is named only when it says more.
                match result.data["subtype"].as_str() {
                    Some(subtype) if subtype != "success" => {
                        bail!("the turn ended with an error ({subtype}): {}", result.text)
                    }
                    _ => bail!("the turn ended with an error: {}", result.text),
                }
            }
        }
        Command::Approvals { agent, all, json, output } => {
            let format = output.format(json)?;
            let query = api::ApprovalsQuery { agent, pending: (!all).then_some(true) };
            let approvals: Vec<Approval> = client.get_query("/v1/approvals", &query).await?;
            format.print_list(&approvals, |wide| client::approvals_table(&approvals, wide), |a| a.id.clone())?;
        }
        Command::Approve { ids } => {
            for id in ids {
                let path = format!("/v1/approvals/{}", client::encode(&id));
                let body = api::DecisionRequest { decision: Decision::Allow, message: None };
                client.call_with::<_, Approval>(Method::POST, &path, Some(&body)).await?;
                println!("{id} allowed");
            }
        }
        Command::Deny { ids, message } => {
            for id in ids {
                let path = format!("/v1/approvals/{}", client::encode(&id));
                let body = api::DecisionRequest { decision: Decision::Deny, message: message.clone() };
                client.call_with::<_, Approval>(Method::POST, &path, Some(&body)).await?;
                println!("{id} denied");
            }
        }
        Command::Chat { name } => agentd::chat::run(&client, &name).await?,
        Command::Conversation { name, follow, json, output } => {
            // JSON is one line per entry, so that a followed conversation can be read line by line.
            let format = output.format(json)?;
            let print = |entry: &ConversationEntry| -> Result<()> {
                let line =
                    format.render_one(entry, |wide| client::conversation_line(entry, wide), |e| e.seq.to_string())?;
                println!("{line}");
                Ok(())
            };
            let mut last = 0;
            loop {
                let query = api::ConversationQuery { after: Some(last), limit: Some(1000) };
                let page: Vec<ConversationEntry> =
                    client.get_query(&format!("{}/conversation", agent_path(&name)), &query).await?;
                for entry in &page {
                    print(entry)?;
                    last = entry.seq;
                }
                // A page is short when it hits the daemon's byte budget: read on until
                // one is empty.
                if page.is_empty() {
                    break;
                }
            }
            if follow {
                let after = api::ConversationQuery { after: Some(last), limit: None };
                let stream = client.open_stream(&format!("{}/conversation/stream", agent_path(&name)), &after).await?;
                let mut failed = None;
                client
                    .follow_conversation(stream, |entry| match print(&entry) {
                        Ok(()) => true,
                        Err(e) => {
                            failed = Some(e);
                            false
                        }
                    })
                    .await?;
                if let Some(e) = failed {
                    return Err(e);
                }
            }
        }
        Command::Version => {
            println!("client: agentd {}", env!("CARGO_PKG_VERSION"));
            let health = client.health().await.with_context(|| format!("server: cannot ask the daemon at {url}"))?;
            let version = health["version"].as_str().unwrap_or("unknown (its /healthz names no version)");
            let backend = health["backend"].as_str().unwrap_or("unknown");
            println!("server: agentd {version} ({backend} backend, {url})");
        }
        Command::Serve | Command::Config(_) | Command::Completion { .. } | Command::Man { .. } => {
            bail!("not a client command")
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag and argument of `cmd` and its subcommands that has no help text, and
    /// every option taking a value whose help shows no default.
    fn undocumented(cmd: &clap::Command, path: &str, problems: &mut Vec<String>) {
        for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let takes_value = matches!(arg.get_action(), clap::ArgAction::Set | clap::ArgAction::Append);
            if help.is_empty() {
                problems.push(format!("{path} {id}: no help text"));
            } else if takes_value
                && !arg.is_positional()
                && arg.get_default_values().is_empty()
                && !help.contains("[default:")
            {
                problems.push(format!("{path} --{id}: the help shows no default ({help:?})"));
            }
        }
        for sub in cmd.get_subcommands() {
            undocumented(sub, &format!("{path} {}", sub.get_name()), problems);
        }
    }

    #[test]
    fn every_flag_has_help_text_and_shows_its_default() {
        let mut problems = Vec::new();
        undocumented(&cli_command(), "agentd", &mut problems);
        assert!(problems.is_empty(), "undocumented flags:\n{}", problems.join("\n"));
    }

    #[test]
    fn the_grammar_is_consistent() {
        cli_command().debug_assert();
        documented_command().debug_assert();
    }
}
