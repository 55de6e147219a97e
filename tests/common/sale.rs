//! A whole sale in the test process: N real nodes on ephemeral ports over one
//! store (a real redis-server or the embedded store), plus a buyer storm.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use hyper::StatusCode;
use spike::config::Config;
use spike::node::{Node, Store};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use super::http::{TestClient, get};

/// A config for `weights.len()` nodes; `redis_url` None means embedded.
pub fn sale_config(
    event: &str,
    total: u64,
    per_user_limit: u64,
    weights: &[u32],
    redis_url: Option<&str>,
    extra_sale: &str,
) -> String {
    let mut text = format!(
        "[sale]\nevent = \"{event}\"\ntotal = {total}\nper_user_limit = {per_user_limit}\n{extra_sale}\n"
    );
    if let Some(url) = redis_url {
        text.push_str(&format!("[redis]\nurl = \"{url}\"\ntimeout = \"1s\"\n"));
    }
    for (i, w) in weights.iter().enumerate() {
        text.push_str(&format!(
            "[[node]]\nname = \"n{}\"\nlisten = \"127.0.0.1:{}\"\nweight = {w}\n",
            i + 1,
            super::free_port()
        ));
    }
    text
}

/// Nodes serving in this process.
pub struct InProcessSale {
    /// The validated config.
    pub config: Config,
    /// Where each node listens, and its state.
    pub nodes: Vec<(SocketAddr, Arc<Node>)>,
    /// The shared store.
    pub store: Store,
    stop: Option<watch::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl InProcessSale {
    /// Starts every node of `config_text` and initialises the stock.
    pub async fn start(config_text: &str) -> InProcessSale {
        let config = Config::parse(Path::new("test.toml"), config_text).expect("valid test config");
        let sale = config.sale().cloned().expect("sale");
        let store = Store::open(&sale, config.redis.as_ref())
            .await
            .expect("store");
        assert!(store.init(true).await.expect("init").is_some(), "init");
        let (stop, rx) = watch::channel(());
        let mut nodes = Vec::new();
        let mut tasks = Vec::new();
        for n in &config.nodes {
            let node = spike::node::build(&config, &n.name, store.clone()).expect("node");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tasks.push(spike::node::spawn(
                listener,
                node.clone(),
                config.server.clone(),
                rx.clone(),
            ));
            nodes.push((addr, node));
        }
        InProcessSale {
            config,
            nodes,
            store,
            stop: Some(stop),
            tasks,
        }
    }

    /// Node addresses.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|(a, _)| *a).collect()
    }

    /// Stops the nodes and waits for them.
    pub async fn stop(mut self) {
        self.stop.take();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

/// One answer a buyer got.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The buyer.
    pub buyer: String,
    /// The node asked.
    pub node: SocketAddr,
    /// HTTP status, or None for a transport error.
    pub status: Option<StatusCode>,
    /// The body (or the transport error).
    pub body: String,
}

/// Sends `requests` purchases, request `i` by buyer `{prefix}{i % buyers}` to
/// node `i % nodes`, with at most `concurrency` in flight.
pub async fn storm(
    client: &TestClient,
    nodes: &[SocketAddr],
    requests: usize,
    buyers: usize,
    concurrency: usize,
    prefix: &str,
) -> Vec<Answer> {
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(requests);
    for i in 0..requests {
        let client = client.clone();
        let node = nodes[i % nodes.len()];
        let buyer = format!("{prefix}{}", i % buyers);
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            let path = format!("/buy/ticket?user={buyer}");
            match get(&client, node, &path).await {
                Ok((status, body)) => Answer {
                    buyer,
                    node,
                    status: Some(status),
                    body,
                },
                Err(e) => Answer {
                    buyer,
                    node,
                    status: None,
                    body: e,
                },
            }
        }));
    }
    let mut answers = Vec::with_capacity(requests);
    for t in tasks {
        answers.push(t.await.expect("buyer task"));
    }
    answers
}

/// Answers with this status.
pub fn count(answers: &[Answer], status: StatusCode) -> usize {
    answers.iter().filter(|a| a.status == Some(status)).count()
}
