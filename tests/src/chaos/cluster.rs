//! A three-node nats-server cluster on loopback with JetStream, each node
//! its own config file (cluster name, routes to the others, store dir), and
//! every route through a [`Proxy`] per direction so a test can partition a
//! node and heal it. Nodes can be SIGKILLed and started again on the same
//! ports and store dirs, where they catch up from the others.

use super::free_port;
use super::proxy::Proxy;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const NODES: usize = 3;
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One node: its ports, config file and process.
pub struct Node {
    pub name: String,
    pub client_port: u16,
    pub cluster_port: u16,
    pub conf: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self, binary: &Path) {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("node log");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

use std::os::unix::process::CommandExt;

/// The cluster; nodes are killed when it drops.
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// `(from, to)` → the proxy `from` reaches `to`'s route port through.
    proxies: BTreeMap<(usize, usize), Proxy>,
    binary: PathBuf,
}

/// A nats config value: a quoted string.
fn quoted(value: &str) -> String {
    serde_json::Value::String(value.into()).to_string()
}

impl Cluster {
    pub async fn start(binary: &Path, dir: &Path) -> Cluster {
        let mut nodes = Vec::new();
        for i in 0..NODES {
            let name = format!("n{i}");
            nodes.push(Node {
                conf: dir.join(format!("{name}.conf")),
                log: dir.join(format!("{name}.log")),
                name,
                client_port: free_port(),
                cluster_port: free_port(),
                child: None,
            });
        }
        let mut proxies = BTreeMap::new();
        for from in 0..NODES {
            for to in (0..NODES).filter(|to| *to != from) {
                let target = SocketAddr::from(([127, 0, 0, 1], nodes[to].cluster_port));
                proxies.insert((from, to), Proxy::start(target).await);
            }
        }
        for (i, node) in nodes.iter().enumerate() {
            let routes: Vec<String> = (0..NODES)
                .filter(|to| *to != i)
                .map(|to| {
                    quoted(&format!(
                        "nats-route://127.0.0.1:{}",
                        proxies[&(i, to)].port
                    ))
                })
                .collect();
            let store = dir.join(&node.name);
            // Routes are all explicit; a node learning another's address
            // from gossip must not bypass the proxies, so the advertised
            // route address leads nowhere.
            let conf = format!(
                "server_name: {name}\nlisten: {listen}\njetstream {{ store_dir: {store} }}\n\
                 cluster {{\n  name: \"ty-test\"\n  listen: {cluster}\n  advertise: \"127.0.0.1:1\"\n  \
                 routes: [{routes}]\n}}\n",
                name = quoted(&node.name),
                listen = quoted(&format!("127.0.0.1:{}", node.client_port)),
                store = quoted(&store.display().to_string()),
                cluster = quoted(&format!("127.0.0.1:{}", node.cluster_port)),
                routes = routes.join(", "),
            );
            std::fs::write(&node.conf, conf).expect("node config");
        }
        let mut cluster = Cluster {
            nodes,
            proxies,
            binary: binary.to_owned(),
        };
        for node in &mut cluster.nodes {
            node.spawn(binary);
        }
        cluster.wait_ready().await;
        cluster
    }

    /// Every node's client URL, comma-separated.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until JetStream answers through every running node.
    pub async fn wait_ready(&self) {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let url = node.url();
            crate::wait_for(&format!("{} ready", node.name), READY_TIMEOUT, || {
                let url = url.clone();
                async move {
                    let client = async_nats::connect(url).await.ok()?;
                    let js = async_nats::jetstream::new(client);
                    js.query_account().await.ok().map(|_| ())
                }
            })
            .await;
        }
    }

    pub fn kill(&mut self, node: usize) {
        self.nodes[node].kill();
    }

    /// Starts a killed node again on its ports and store dir.
    pub fn restart(&mut self, node: usize) {
        let binary = self.binary.clone();
        self.nodes[node].spawn(&binary);
    }

    /// Cuts every route to and from `node`.
    pub fn partition(&self, node: usize) {
        for ((from, to), proxy) in &self.proxies {
            if *from == node || *to == node {
                proxy.cut();
            }
        }
    }

    pub fn heal(&self, node: usize) {
        for ((from, to), proxy) in &self.proxies {
            if *from == node || *to == node {
                proxy.heal();
            }
        }
    }

    /// The index of the node leading `stream`.
    pub async fn leader_of(&self, js: &async_nats::jetstream::Context, stream: &str) -> usize {
        let name = crate::wait_for(&format!("{stream} leader"), READY_TIMEOUT, || async {
            let mut stream = js.get_stream(stream).await.ok()?;
            let info = stream.info().await.ok()?;
            info.cluster.as_ref()?.leader.clone()
        })
        .await;
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("leader {name} is no node"))
    }

    /// Waits until every replica of `stream` is current with no lag.
    pub async fn wait_caught_up(&self, js: &async_nats::jetstream::Context, stream: &str) {
        crate::wait_for(
            &format!("{stream} replicas caught up"),
            READY_TIMEOUT,
            || async {
                let mut stream = js.get_stream(stream).await.ok()?;
                let info = stream.info().await.ok()?;
                let cluster = info.cluster.as_ref()?;
                (cluster.replicas.len() == NODES - 1
                    && cluster
                        .replicas
                        .iter()
                        .all(|r| r.current && r.lag.unwrap_or(0) == 0))
                .then_some(())
            },
        )
        .await;
    }
}
