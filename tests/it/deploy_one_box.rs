//! The one-box deployment checked without Docker: `deploy/compose.yaml`
//! with the image of `deploy/Dockerfile`, the services' `trainyard.toml`
//! and the autoscaler's `autoscaler.toml`. Every service runs a program the
//! image has and mounts files that exist (or that `yard fleet init`
//! writes); every file its environment names is mounted; its config loads
//! through the real loader as its container sees it (file, environment,
//! flags) and names its own role's identity. The autoscaler's workers are
//! loaded as the `local` provider starts them (the autoscaler's
//! environment, the machine's, `--config`): each connects as the worker
//! role of its pool, with the slots the pool counts on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use trainyard_autoscaler::provider::local::LocalProvider;
use trainyard_autoscaler::service::machine_env;
use trainyard_core::Config;
use trainyard_core::topology::permissions::Role;
use trainyard_proto::v1::Stage;

/// Where the image puts its binaries (`deploy/Dockerfile`).
const IMAGE_BIN: &str = "/usr/local/bin";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// One compose service, as far as these checks read it.
struct Service {
    name: String,
    image: String,
    entrypoint: Vec<String>,
    command: Vec<String>,
    profiles: Vec<String>,
    /// Its environment, `${VAR…}` substituted.
    env: Vec<(String, String)>,
    /// Container path → host source (`./…` relative to `deploy/`, or a
    /// named volume).
    mounts: BTreeMap<String, String>,
}

impl Service {
    /// The host file mounted at `container` (a file mount, or a file under
    /// a mounted folder).
    fn host_file(&self, container: &Path) -> Option<String> {
        self.mounts.iter().find_map(|(at, source)| {
            let rest = container.strip_prefix(at).ok()?;
            let source = source.strip_prefix("./")?;
            Some(if rest.as_os_str().is_empty() {
                source.to_string()
            } else {
                format!("{source}/{}", rest.display())
            })
        })
    }

    fn mounts(&self, container: &Path) -> bool {
        self.mounts.keys().any(|at| container.starts_with(at))
    }

    fn config_file(&self) -> Option<PathBuf> {
        let (_, file) = self.env.iter().find(|(k, _)| k == "TY_CONFIG")?;
        let host = self
            .host_file(Path::new(file))
            .unwrap_or_else(|| panic!("{}: TY_CONFIG {file} is not mounted", self.name));
        Some(deploy_dir().join(host))
    }

    /// Its `--set` flags.
    fn overrides(&self) -> Vec<String> {
        self.command
            .windows(2)
            .filter(|w| w[0] == "--set")
            .map(|w| w[1].clone())
            .collect()
    }

    /// Its config as its container loads it.
    fn config(&self, extra_env: &[(String, String)]) -> Config {
        let file = self.config_file().expect("a trainyard service");
        let env: Vec<(String, String)> = self.env.iter().chain(extra_env).cloned().collect();
        Config::load_from(Some(&file), &env, &self.overrides())
            .unwrap_or_else(|e| panic!("{}: {}: {e}", self.name, file.display()))
    }
}

fn strings(value: &serde_yaml::Value) -> Vec<String> {
    value
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().expect("a string").to_string())
        .collect()
}

/// `${NAME}` and `${NAME:?message}` with the values an operator sets.
fn substitute(value: &str, vars: &BTreeMap<&str, String>) -> String {
    let Some(start) = value.find("${") else {
        return value.to_string();
    };
    let end = start + value[start..].find('}').expect("a closing brace");
    let name = value[start + 2..end]
        .split([':', '-', '?'])
        .next()
        .expect("a name");
    let set = vars
        .get(name)
        .unwrap_or_else(|| panic!("compose asks for ${{{name}}}, which the check does not set"));
    substitute(
        &format!("{}{set}{}", &value[..start], &value[end + 1..]),
        vars,
    )
}

fn services(vars: &BTreeMap<&str, String>) -> (Vec<Service>, Vec<String>) {
    let text = std::fs::read_to_string(deploy_dir().join("compose.yaml")).expect("compose.yaml");
    let mut compose: serde_yaml::Value = serde_yaml::from_str(&text).expect("compose.yaml parses");
    compose.apply_merge().expect("merge keys");
    // `<<: *env` inside a service's environment is merged too.
    for (_, service) in compose["services"].as_mapping_mut().expect("services") {
        if let Some(env) = service.get_mut("environment") {
            env.apply_merge().expect("merge keys");
        }
    }
    let volumes: Vec<String> = compose["volumes"]
        .as_mapping()
        .into_iter()
        .flatten()
        .map(|(k, _)| k.as_str().unwrap().to_string())
        .collect();
    let services = compose["services"]
        .as_mapping()
        .expect("services")
        .iter()
        .map(|(name, s)| {
            let name = name.as_str().unwrap().to_string();
            let env = s["environment"]
                .as_mapping()
                .into_iter()
                .flatten()
                .map(|(k, v)| {
                    let value = v.as_str().unwrap_or_else(|| panic!("{name}: quote {k:?}"));
                    (k.as_str().unwrap().to_string(), substitute(value, vars))
                })
                .collect();
            let mounts = strings(&s["volumes"])
                .iter()
                .map(|spec| {
                    let mut parts = spec.split(':');
                    let source = parts.next().unwrap().to_string();
                    let at = parts.next().expect("source:target").to_string();
                    (at, source)
                })
                .collect();
            Service {
                image: s["image"].as_str().unwrap_or_default().to_string(),
                entrypoint: strings(&s["entrypoint"]),
                command: strings(&s["command"]),
                profiles: strings(&s["profiles"]),
                env,
                mounts,
                name,
            }
        })
        .collect();
    (services, volumes)
}

/// The programs the image installs: the release binaries it copies to
/// [`IMAGE_BIN`], and the Debian packages' own.
fn image_programs() -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(deploy_dir().join("Dockerfile")).expect("Dockerfile");
    let joined = text.replace("\\\n", " ");
    let copy = joined
        .lines()
        .find(|l| l.starts_with("COPY --from=build"))
        .expect("the binaries copied from the build stage");
    let words: Vec<&str> = copy.split_whitespace().collect();
    assert_eq!(words.last(), Some(&"/usr/local/bin/"), "{copy}");
    let binaries = words
        .iter()
        .filter_map(|w| w.strip_prefix("/src/target/release/"))
        .map(String::from)
        .collect();
    let install = joined
        .lines()
        .find(|l| l.contains("apt-get install"))
        .expect("apt-get install");
    let packages = install
        .split("--no-install-recommends")
        .nth(1)
        .expect("packages")
        .split("&&")
        .next()
        .unwrap()
        .split_whitespace()
        .map(String::from)
        .collect();
    (binaries, packages)
}

/// The role a service connects as, by the program it runs.
fn role_of(program: &str, config: &Config) -> Role {
    match program {
        "ty-coordinator" => Role::Coordinator,
        "ty-captioner" => Role::Captioner,
        "ty-worker" => Role::Worker {
            pool: config.worker.pool.clone(),
        },
        "ty-uploader" => Role::Uploader,
        "ty-autoscaler" => Role::Autoscaler,
        other => panic!("no role for {other}"),
    }
}

fn seed_of(role: &Role) -> PathBuf {
    Path::new("/etc/trainyard/fleet").join(format!("{}.nk", role.name()))
}

#[test]
fn the_one_box_compose_runs_what_the_image_has_with_configs_that_load() {
    // What `yard fleet init deploy/fleet …` writes, and the token line of
    // `yard token new` the coordinator requires.
    let fleet = tempfile::tempdir().unwrap();
    trainyard_core::fleet::init(fleet.path(), &Default::default()).expect("fleet init");
    let tokens = format!(
        "{{ \"{}\" = \"acme\" }}",
        trainyard_core::auth::token_key("a-token")
    );
    let vars = BTreeMap::from([("TY_COORDINATOR__TOKENS", tokens)]);
    let (services, volumes) = services(&vars);
    let (binaries, packages) = image_programs();
    let by_name = |n: &str| {
        services
            .iter()
            .find(|s| s.name == n)
            .unwrap_or_else(|| panic!("compose runs {n}"))
    };

    for s in &services {
        // Mounted files exist, or fleet init writes them; volumes are declared.
        for (at, source) in &s.mounts {
            if let Some(generated) = source.strip_prefix("./fleet") {
                assert!(
                    fleet
                        .path()
                        .join(generated.trim_start_matches('/'))
                        .exists(),
                    "{}: mounts {source}, which yard fleet init does not write",
                    s.name
                );
            } else if let Some(file) = source.strip_prefix("./") {
                assert!(
                    deploy_dir().join(file).exists(),
                    "{}: mounts {source}, which is missing",
                    s.name
                );
            } else {
                assert!(volumes.contains(source), "{}: volume {source}", s.name);
            }
            assert!(at.starts_with('/'), "{}: {at}", s.name);
        }
        // Every file the environment names is mounted.
        for (key, value) in &s.env {
            if value.starts_with("/etc/trainyard/") {
                assert!(s.mounts(Path::new(value)), "{}: {key}={value}", s.name);
            }
        }
        if s.image != "trainyard:latest" {
            continue;
        }
        // The image runs it: a binary it copies, behind a packaged init.
        let program = &s.command[0];
        assert!(binaries.contains(program), "{}: {program}", s.name);
        if let Some(init) = s.entrypoint.first() {
            assert!(packages.contains(init), "{}: entrypoint {init}", s.name);
        }
        // Its config loads as the container sees it, with its role's identity.
        let config = s.config(&[]);
        let role = role_of(program, &config);
        assert_eq!(
            config.nats.nkey_seed_file,
            Some(seed_of(&role)),
            "{}",
            s.name
        );
        assert!(
            config
                .nats
                .tls_ca_file
                .as_deref()
                .is_some_and(|f| s.mounts(f))
        );
        assert!(!config.nats.insecure_dev);
        if role != Role::Autoscaler && role != Role::Coordinator {
            let key = config.secrets.key_file.as_deref().expect("the secrets key");
            assert!(s.mounts(key), "{}", s.name);
        }
    }

    // The NATS server finds the files its config names where they are mounted.
    let nats = by_name("nats");
    let conf_at = nats
        .command
        .windows(2)
        .find(|w| w[0] == "-c")
        .map(|w| PathBuf::from(&w[1]))
        .expect("nats-server -c <file>");
    let conf = deploy_dir().join(nats.host_file(&conf_at).expect("nats.conf is mounted"));
    let mut named = 0;
    for line in std::fs::read_to_string(&conf).unwrap().lines() {
        let line = line.trim();
        let file = if let Some(include) = line.strip_prefix("include ") {
            conf_at.parent().unwrap().join(include.trim())
        } else if let Some((_, value)) = line.split_once(':')
            && value
                .trim()
                .trim_matches('"')
                .starts_with("/etc/trainyard/")
        {
            PathBuf::from(value.trim().trim_matches('"'))
        } else {
            continue;
        };
        let file: PathBuf = file.components().filter(|c| c.as_os_str() != ".").collect();
        assert!(nats.mounts(&file), "nats.conf names {}", file.display());
        named += 1;
    }
    assert!(named >= 3, "the certificate, its key and the users");

    // Without the profile: one of each stage; with it, the autoscaler too,
    // and the fixed worker scaled to none (`--scale worker=0`).
    for fixed in ["nats", "coordinator", "captioner", "worker", "uploader"] {
        assert!(by_name(fixed).profiles.is_empty(), "{fixed}");
    }
    let scaler = by_name("autoscaler");
    assert_eq!(scaler.profiles, ["autoscale"]);
    assert!(binaries.contains(&"ty-autoscaler".to_string()));
    let config = scaler.config(&[]);
    let a = &config.autoscaler;
    assert_eq!(a.provider, "local");
    assert_eq!(a.local.bin_dir.as_deref(), Some(Path::new(IMAGE_BIN)));
    // The workers read the services' own file.
    let children = a.local.config_file.as_deref().expect("the workers' config");
    assert_eq!(
        scaler.host_file(children),
        by_name("worker").host_file(Path::new("/etc/trainyard/trainyard.toml")),
    );
    let children_file = deploy_dir().join(scaler.host_file(children).unwrap());
    assert!(!a.pools.is_empty());
    for (pool, policy) in &a.pools {
        let (stage, _) = trainyard_autoscaler::backlog::stage_of_pool(pool).expect("a pool");
        let binary = LocalProvider::binary(pool).unwrap();
        assert!(binaries.contains(&binary.to_string()), "{pool}: {binary}");
        assert!(policy.min_workers <= policy.max_workers && policy.max_workers > 0);
        // A worker as the local provider starts it: the autoscaler's
        // environment, the machine's over it, `--config`.
        let name = trainyard_autoscaler::service::machine_name(&a.fleet_name, pool, 0);
        let env: Vec<(String, String)> = scaler
            .env
            .iter()
            .cloned()
            .chain(machine_env(pool, policy, &name))
            .collect();
        let worker = Config::load_from(Some(&children_file), &env, &[])
            .unwrap_or_else(|e| panic!("{pool}: {e}"));
        let role = role_of(binary, &worker);
        assert_eq!(worker.nats.nkey_seed_file, Some(seed_of(&role)), "{pool}");
        assert!(
            scaler.mounts(&seed_of(&role)),
            "{pool}: its seed is mounted"
        );
        assert!(fleet.path().join(format!("{}.nk", role.name())).exists());
        assert_eq!(worker.runtime.worker_id, name);
        let key = worker.secrets.key_file.as_deref().expect("the secrets key");
        assert!(scaler.mounts(key), "{pool}");
        let slots = match stage {
            Stage::Train => worker.worker.concurrency,
            Stage::Prepare => worker.captioner.concurrency,
            _ => worker.uploader.concurrency,
        };
        assert_eq!(
            policy.tasks_per_worker as usize, slots,
            "{pool}: the pool counts the slots its worker has"
        );
    }
    // With the profile on, run as compose.yaml says (`--scale <service>=0`
    // for the services it replaces), each stage is served exactly once:
    // by a fixed service or by a pool.
    let text = std::fs::read_to_string(deploy_dir().join("compose.yaml")).unwrap();
    let documented = text
        .lines()
        .find(|l| l.contains("--profile autoscale up"))
        .expect("the command with the autoscaler");
    let scaled_to_zero: Vec<&str> = documented
        .split_whitespace()
        .filter_map(|w| w.strip_suffix("=0"))
        .collect();
    assert!(
        std::fs::read_to_string(deploy_dir().join("../README.md"))
            .unwrap()
            .contains(documented.trim_start_matches('#').trim()),
        "README.md shows {documented}"
    );
    for pool in ["prepare", "deliver", "train.default"] {
        let program = LocalProvider::binary(pool).unwrap();
        let fixed = services
            .iter()
            .filter(|s| s.profiles.is_empty() && !scaled_to_zero.contains(&s.name.as_str()))
            .filter(|s| s.command.first().map(String::as_str) == Some(program))
            .count();
        let pooled = usize::from(a.pools.contains_key(pool));
        assert_eq!(
            fixed + pooled,
            1,
            "{pool}: {fixed} fixed services, {pooled} pool"
        );
    }
}
