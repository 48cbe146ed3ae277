//! The autoscaler's `kubernetes` provider against the stand-in API server
//! (`trainyard_tests::kube`): launch raises a Deployment's replicas by one
//! through its Scale, with the version read (a conflict is redone from a
//! fresh read), release marks its pod to go first and lowers the count,
//! and errors map to the provider's kinds. Then the deploy folder's
//! Kubernetes manifests: the KEDA ScaledObjects against the fields of
//! `keda.sh/v1alpha1`, and every kustomization's resources present.

use axum::http::Method;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use trainyard_autoscaler::provider::kubernetes::KubernetesProvider;
use trainyard_autoscaler::provider::{Launch, MachineState, Provider, ProviderError};
use trainyard_core::config::KubernetesConfig;
use trainyard_tests::kube::{DELETION_COST, FakeKube};

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.k8s-test-token-7f3a9c";
const NS: &str = "trainyard";
const DEPLOYMENT: &str = "ty-worker-flux";
const POOL: &str = "train.flux";

struct Fixture {
    kube: FakeKube,
    provider: KubernetesProvider,
    _dir: tempfile::TempDir,
}

async fn fixture(replicas: i32) -> Fixture {
    let kube = FakeKube::start(TOKEN, NS).await;
    kube.add_deployment(DEPLOYMENT, replicas);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let config = KubernetesConfig {
        api_url: kube.url(),
        namespace: NS.into(),
        token_file: Some(token_file),
        ca_file: None,
        deployments: BTreeMap::from([(POOL.into(), DEPLOYMENT.into())]),
    };
    let provider = KubernetesProvider::new(&config).await.unwrap();
    Fixture {
        kube,
        provider,
        _dir: dir,
    }
}

fn launch(name: &str) -> Launch {
    Launch {
        name: name.into(),
        pool: POOL.into(),
        env: BTreeMap::new(),
        gpu_types: vec!["NVIDIA GeForce RTX 4090".into()],
        gpu_count: 1,
        interruptible: false,
        bid_per_gpu: 0.0,
        max_price_per_gpu: 0.0,
        avoid_hosts: Vec::new(),
    }
}

fn scale_path() -> String {
    format!("/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOYMENT}/scale")
}

#[tokio::test]
async fn launch_raises_replicas_by_one_through_the_scale() {
    let f = fixture(1).await;
    let machine = f
        .provider
        .launch(&launch("trainyard-train.flux-a1"))
        .await
        .unwrap();
    assert_eq!(f.kube.replicas(DEPLOYMENT), 2);
    assert_eq!(f.kube.pods(DEPLOYMENT).len(), 2);
    assert_eq!(machine.state, MachineState::Pending);
    assert_eq!(machine.name, "trainyard-train.flux-a1");
    assert!(f.provider.replica_based());

    let requests = f.kube.requests();
    let calls: Vec<(Method, String)> = requests
        .iter()
        .map(|r| (r.method.clone(), r.path.clone()))
        .collect();
    assert_eq!(
        calls,
        vec![(Method::GET, scale_path()), (Method::PUT, scale_path())]
    );
    let read = serde_json::from_slice::<serde_json::Value>(&requests[0].body);
    assert!(read.is_err(), "a GET has no body");
    let put = &requests[1];
    assert_eq!(put.content_type, "application/json");
    let body = put.json();
    assert_eq!(body["kind"], "Scale");
    assert_eq!(body["apiVersion"], "autoscaling/v1");
    assert_eq!(body["spec"]["replicas"], 2);
    assert!(
        !body["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .is_empty(),
        "the PUT carries the version read: {body}"
    );
    assert_eq!(put.status, 200);

    // The same launch again is answered without another replica.
    let again = f
        .provider
        .launch(&launch("trainyard-train.flux-a1"))
        .await
        .unwrap();
    assert_eq!(again, machine);
    assert_eq!(f.kube.replicas(DEPLOYMENT), 2);
    assert_eq!(f.kube.requests().len(), 2);

    // The pods are listed under their own names, with the pool.
    let listed = f.provider.list().await.unwrap();
    let mut names: Vec<String> = listed.iter().map(|m| m.name.clone()).collect();
    names.sort();
    let mut pods: Vec<String> = f
        .kube
        .pods(DEPLOYMENT)
        .into_iter()
        .map(|p| p.name)
        .collect();
    pods.sort();
    assert_eq!(names, pods);
    assert!(
        listed
            .iter()
            .all(|m| m.pool == POOL && m.state == MachineState::Running)
    );
    assert!(
        listed
            .iter()
            .all(|m| m.host == "gpu-node-1" && m.created_at_ms > 0)
    );
    let list = f.kube.requests().pop().unwrap();
    assert_eq!(list.path, format!("/api/v1/namespaces/{NS}/pods"));
    assert_eq!(list.query, "labelSelector=app%3Dty-worker-flux");
}

#[tokio::test]
async fn a_conflicting_write_is_redone_from_a_fresh_read() {
    let f = fixture(1).await;
    f.kube.race_next_put();
    f.provider
        .launch(&launch("trainyard-train.flux-b1"))
        .await
        .unwrap();
    assert_eq!(f.kube.replicas(DEPLOYMENT), 2, "raised once, not twice");
    let seen: Vec<(Method, u16)> = f
        .kube
        .requests()
        .iter()
        .map(|r| (r.method.clone(), r.status))
        .collect();
    assert_eq!(
        seen,
        vec![
            (Method::GET, 200),
            (Method::PUT, 409),
            (Method::GET, 200),
            (Method::PUT, 200)
        ]
    );
    let puts: Vec<_> = f
        .kube
        .requests()
        .into_iter()
        .filter(|r| r.method == Method::PUT)
        .map(|r| r.json()["metadata"]["resourceVersion"].clone())
        .collect();
    assert_ne!(puts[0], puts[1], "the second write carries the new version");
}

#[tokio::test]
async fn a_write_whose_answer_was_lost_is_not_applied_twice() {
    let f = fixture(1).await;
    f.kube.lose_next_put_answer();
    f.provider
        .launch(&launch("trainyard-train.flux-b2"))
        .await
        .unwrap();
    assert_eq!(f.kube.replicas(DEPLOYMENT), 2, "raised once, not twice");
    let seen: Vec<(Method, u16)> = f
        .kube
        .requests()
        .iter()
        .map(|r| (r.method.clone(), r.status))
        .collect();
    // The PUT is sent again with the same version, gets 409, and a fresh
    // read shows the count it aimed at.
    assert_eq!(
        seen,
        vec![
            (Method::GET, 200),
            (Method::PUT, 500),
            (Method::PUT, 409),
            (Method::GET, 200)
        ]
    );
}

#[tokio::test]
async fn release_removes_the_annotated_pod_first() {
    let f = fixture(3).await;
    let machines = f.provider.list().await.unwrap();
    assert_eq!(machines.len(), 3);
    // Neither the oldest nor the newest: the one the controller would not
    // pick by itself.
    let middle = f.kube.pods(DEPLOYMENT)[1].name.clone();
    let victim = machines.iter().find(|m| m.name == middle).unwrap().clone();

    f.provider.release(&victim).await.unwrap();
    assert_eq!(f.kube.replicas(DEPLOYMENT), 2);
    let left: Vec<String> = f
        .kube
        .pods(DEPLOYMENT)
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(left.len(), 2);
    assert!(!left.contains(&victim.name), "{left:?}");
    let removed: Vec<(String, i64)> = f
        .kube
        .removed()
        .into_iter()
        .map(|r| (r.name, r.deletion_cost))
        .collect();
    assert_eq!(removed, [(victim.name.clone(), i64::from(i32::MIN))]);

    let patch = f
        .kube
        .requests()
        .into_iter()
        .find(|r| r.method == Method::PATCH)
        .expect("the pod was patched");
    assert_eq!(
        patch.path,
        format!("/api/v1/namespaces/{NS}/pods/{}", victim.name)
    );
    assert_eq!(patch.content_type, "application/merge-patch+json");
    let cost = patch.json()["metadata"]["annotations"][DELETION_COST].clone();
    assert_eq!(cost, i32::MIN.to_string());
    assert_eq!(patch.status, 200);

    // Released again (a lost answer): the pod is gone, the count stays.
    f.provider.release(&victim).await.unwrap();
    assert_eq!(f.kube.replicas(DEPLOYMENT), 2);
}

#[tokio::test]
async fn a_missing_deployment_is_refused() {
    let f = fixture(1).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let config = KubernetesConfig {
        api_url: f.kube.url(),
        namespace: NS.into(),
        token_file: Some(token_file),
        ca_file: None,
        deployments: BTreeMap::from([(POOL.into(), "ty-worker-nope".into())]),
    };
    let provider = KubernetesProvider::new(&config).await.unwrap();
    let err = provider
        .launch(&launch("trainyard-train.flux-c1"))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("ty-worker-nope"), "{err}");
    let err = provider.list().await.unwrap_err();
    assert!(matches!(err, ProviderError::Refused(_)), "{err:?}");
    // A pool with no deployment at all is refused before any request.
    let before = f.kube.requests().len();
    let mut other = launch("trainyard-train.sdxl-c2");
    other.pool = "train.sdxl".into();
    let err = provider.launch(&other).await.unwrap_err();
    assert!(matches!(err, ProviderError::Refused(_)), "{err:?}");
    assert_eq!(f.kube.requests().len(), before);
}

#[tokio::test]
async fn server_errors_are_retried_then_unavailable() {
    let f = fixture(1).await;
    f.kube.fail_next(Method::GET, 503);
    f.kube.fail_next(Method::PUT, 500);
    f.kube.fail_next(Method::GET, 429);
    f.provider
        .launch(&launch("trainyard-train.flux-d1"))
        .await
        .unwrap();
    assert_eq!(f.kube.replicas(DEPLOYMENT), 2);
    let statuses: Vec<u16> = f.kube.requests().iter().map(|r| r.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s >= 429).count(),
        3,
        "{statuses:?}"
    );

    // An outage longer than the retries: unavailable, and nothing changed.
    for _ in 0..10 {
        f.kube.fail_next(Method::GET, 503);
    }
    let err = f
        .provider
        .launch(&launch("trainyard-train.flux-d2"))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");
    assert_eq!(f.kube.replicas(DEPLOYMENT), 2);
}

/// Everything written to a tracing subscriber, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_token_is_never_logged_and_a_wrong_one_is_refused() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let f = fixture(1).await;
    f.kube.fail_next(Method::GET, 503);
    f.provider
        .launch(&launch("trainyard-train.flux-e1"))
        .await
        .unwrap();
    let machines = f.provider.list().await.unwrap();
    f.provider.release(&machines[0]).await.unwrap();

    // A token the server does not accept: refused, not retried.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "wrong-token-5d1e").unwrap();
    let config = KubernetesConfig {
        api_url: f.kube.url(),
        namespace: NS.into(),
        token_file: Some(token_file),
        ca_file: None,
        deployments: BTreeMap::from([(POOL.into(), DEPLOYMENT.into())]),
    };
    let wrong = KubernetesProvider::new(&config).await.unwrap();
    let before = f.kube.requests().len();
    let err = wrong
        .launch(&launch("trainyard-train.flux-e2"))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Refused(_)), "{err:?}");
    assert_eq!(f.kube.requests().len(), before + 1, "a 401 is not retried");
    assert_eq!(f.kube.requests().last().unwrap().status, 401);

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("kubernetes request retried"), "{logs}");
    assert!(logs.contains("deployment scaled"), "{logs}");
    for secret in [TOKEN, "k8s-test-token", "wrong-token-5d1e"] {
        assert!(!logs.contains(secret), "the token is in the logs");
        assert!(!err.to_string().contains(secret));
        assert!(!format!("{:?}", f.provider).contains(secret));
    }
}

// ---- The deploy folder's Kubernetes manifests ----

fn deploy_k8s() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
}

/// The fields of a `keda.sh/v1alpha1` ScaledObject that the manifests use,
/// with their types (from kedacore/keda `config/crd/bases/keda.sh_scaledobjects.yaml`):
/// anything else in a manifest fails to parse.
mod keda {
    // The fields are read by parsing: one a manifest names but the schema
    // lacks fails the test.
    #![allow(dead_code)]
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ScaledObject {
        pub api_version: String,
        pub kind: String,
        pub metadata: Metadata,
        pub spec: Spec,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Metadata {
        pub name: String,
        pub namespace: Option<String>,
        #[serde(default)]
        pub labels: BTreeMap<String, String>,
        #[serde(default)]
        pub annotations: BTreeMap<String, String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Spec {
        pub scale_target_ref: ScaleTargetRef,
        pub polling_interval: Option<i32>,
        pub cooldown_period: Option<i32>,
        pub initial_cooldown_period: Option<i32>,
        pub idle_replica_count: Option<i32>,
        pub min_replica_count: Option<i32>,
        pub max_replica_count: Option<i32>,
        pub triggers: Vec<Trigger>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ScaleTargetRef {
        pub name: String,
        pub api_version: Option<String>,
        pub kind: Option<String>,
        pub env_source_container_name: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Trigger {
        #[serde(rename = "type")]
        pub kind: String,
        pub name: Option<String>,
        pub metadata: BTreeMap<String, String>,
        pub authentication_ref: Option<AuthenticationRef>,
        pub metric_type: Option<String>,
        pub use_cached_metrics: Option<bool>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct AuthenticationRef {
        pub name: String,
        pub kind: Option<String>,
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml")
        })
        .collect();
    files.sort();
    files
}

#[test]
fn keda_scaled_objects_match_the_schema() {
    let files = yaml_files(&deploy_k8s().join("keda"));
    assert!(!files.is_empty());
    let mut pools = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            if value.is_null() {
                continue;
            }
            let so: keda::ScaledObject =
                serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert_eq!(so.api_version, "keda.sh/v1alpha1", "{}", file.display());
            assert_eq!(so.kind, "ScaledObject");
            assert!(!so.spec.scale_target_ref.name.is_empty());
            let (min, max) = (
                so.spec.min_replica_count.unwrap_or(0),
                so.spec.max_replica_count.unwrap_or(100),
            );
            assert!(0 <= min && min <= max, "{}", file.display());
            assert!(so.spec.polling_interval.unwrap_or(30) > 0);
            assert!(so.spec.cooldown_period.unwrap_or(300) >= 0);
            assert_eq!(so.spec.triggers.len(), 1);
            let t = &so.spec.triggers[0];
            assert_eq!(t.kind, "nats-jetstream");
            for key in [
                "natsServerMonitoringEndpoint",
                "account",
                "stream",
                "consumer",
                "lagThreshold",
                "activationLagThreshold",
            ] {
                assert!(t.metadata.contains_key(key), "{}: no {key}", file.display());
            }
            assert_eq!(t.metadata["stream"], "TY_TASKS");
            let endpoint = &t.metadata["natsServerMonitoringEndpoint"];
            assert!(
                !endpoint.contains("://"),
                "host:port, no scheme: {endpoint}"
            );
            for n in ["lagThreshold", "activationLagThreshold"] {
                t.metadata[n]
                    .parse::<u64>()
                    .unwrap_or_else(|e| panic!("{n}: {e}"));
            }
            let consumer = &t.metadata["consumer"];
            let pool = consumer
                .strip_prefix("ty-train-")
                .unwrap_or_else(|| panic!("not a training pool's consumer: {consumer}"));
            pools.push(pool.to_string());
        }
    }
    assert!(pools.len() >= 2, "{pools:?}");
}

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Kustomization {
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    patches: Vec<Patch>,
    #[serde(default)]
    config_map_generator: Vec<Generator>,
}

#[derive(Deserialize)]
struct Generator {
    #[serde(default)]
    files: Vec<String>,
}

#[derive(Deserialize)]
struct Patch {
    path: Option<String>,
}

/// Every `kustomization.yaml` under `dir`.
fn kustomizations(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            kustomizations(&path, out);
        } else if path.ends_with("kustomization.yaml") {
            out.push(path);
        }
    }
}

#[test]
fn every_kustomization_resource_exists() {
    let mut found = Vec::new();
    kustomizations(&deploy_k8s(), &mut found);
    found.sort();
    let names: Vec<String> = found
        .iter()
        .map(|p| p.strip_prefix(deploy_k8s()).unwrap().display().to_string())
        .collect();
    for expected in [
        "base/kustomization.yaml",
        "overlays/dev/kustomization.yaml",
        "overlays/prod/kustomization.yaml",
        "keda/kustomization.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    for file in found {
        let dir = file.parent().unwrap();
        let k: Kustomization =
            serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert!(!k.resources.is_empty(), "{}", file.display());
        let paths = k
            .resources
            .iter()
            .cloned()
            .chain(k.patches.iter().filter_map(|p| p.path.clone()))
            .chain(k.config_map_generator.iter().flat_map(|g| {
                // `key=path` or `path`.
                g.files
                    .iter()
                    .map(|f| f.split_once('=').map_or(f.as_str(), |(_, p)| p).to_string())
            }));
        for resource in paths {
            let path = dir.join(&resource);
            assert!(
                path.exists(),
                "{}: {resource} does not exist",
                file.display()
            );
            if path.is_dir() {
                assert!(path.join("kustomization.yaml").exists(), "{resource}");
            } else if path.extension().is_some_and(|e| e == "yaml") {
                // Each manifest parses as YAML documents.
                let text = std::fs::read_to_string(&path).unwrap();
                for doc in serde_yaml::Deserializer::from_str(&text) {
                    serde_yaml::Value::deserialize(doc)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                }
            }
        }
    }
}

/// The config the manifests mount loads as every pod sees it (its role's
/// environment over the file), and names the worker Deployments that exist,
/// which the autoscaler's Role lets it scale.
#[test]
fn k8s_config_loads_and_names_the_worker_deployments() {
    let base = deploy_k8s().join("base");
    let workers = std::fs::read_to_string(base.join("workers.yaml")).unwrap();
    let mut deployments = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&workers) {
        let d = serde_yaml::Value::deserialize(doc).unwrap();
        let name = d["metadata"]["name"].as_str().unwrap().to_string();
        let container = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            container["resources"]["limits"]["nvidia.com/gpu"].as_u64(),
            Some(1),
            "{name}"
        );
        assert!(d["spec"]["template"]["spec"]["nodeSelector"].is_mapping());
        assert!(
            d["spec"]["replicas"].is_null(),
            "{name}: the autoscaler owns replicas"
        );
        deployments.push(name);
    }
    let rbac = std::fs::read_to_string(base.join("autoscaler.yaml")).unwrap();
    let role = serde_yaml::Deserializer::from_str(&rbac)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .find(|d| d["kind"] == "Role")
        .expect("a Role");
    let scale_rule = &role["rules"][0];
    assert_eq!(scale_rule["resources"][0], "deployments/scale");
    for (dir, env) in [
        (base.join("config"), vec![("TY_WORKER__POOL", "flux")]),
        (
            deploy_k8s().join("overlays/dev"),
            vec![("TY_WORKER__POOL", "flux")],
        ),
    ] {
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config =
            trainyard_core::config::Config::load_from(Some(&dir.join("trainyard.toml")), &env, &[])
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert_eq!(config.autoscaler.provider, "kubernetes");
        assert!(!config.autoscaler.kubernetes.deployments.is_empty());
        for (pool, deployment) in &config.autoscaler.kubernetes.deployments {
            assert!(deployments.contains(deployment), "{pool}: {deployment}");
            assert!(config.autoscaler.pools.contains_key(pool), "{pool}");
            let allowed = scale_rule["resourceNames"].as_sequence().unwrap();
            assert!(
                allowed.iter().any(|n| n == deployment.as_str()),
                "{deployment}"
            );
        }
        if dir.starts_with(&base) {
            assert_eq!(config.nats.replicas, 3, "R3 on the 3-node cluster");
        }
    }
}

/// The RunPod examples: the autoscaler section loads with the config loader
/// (unknown keys are errors) and has the two pools; the template parses and
/// names what a pod template needs.
#[test]
fn runpod_examples_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/runpod");
    let config =
        trainyard_core::config::Config::load_from(Some(&dir.join("autoscaler.toml")), &[], &[])
            .unwrap();
    let a = &config.autoscaler;
    assert_eq!(a.provider, "runpod");
    let flux = &a.pools["train.flux"];
    assert!(flux.interruptible && flux.bid_per_gpu > 0.0);
    assert_eq!(flux.gpu_types, ["NVIDIA GeForce RTX 4090"]);
    assert!(!a.pools["train.sdxl"].interruptible);
    assert!(!a.runpod.image.is_empty());

    let template: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("template.json")).unwrap()).unwrap();
    for key in ["name", "imageName", "volumeMountPath"] {
        assert!(template[key].is_string(), "{key}");
    }
    assert!(template["containerDiskInGb"].is_u64());
    let env: Vec<&str> = template["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    for name in ["TY_NATS__URL", "TY_WORKER__POOL", "TY_NKEY_SEED"] {
        assert!(env.contains(&name), "{name}");
    }
    // The entrypoint reads the variables the template sets.
    let entrypoint = std::fs::read_to_string(dir.join("entrypoint.sh")).unwrap();
    for name in ["TY_NKEY_SEED", "TY_NATS_CA_PEM", "TY_SECRETS_KEY"] {
        assert!(entrypoint.contains(name) && env.contains(&name), "{name}");
    }
}
