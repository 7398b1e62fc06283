//! The load and its completion: Node creates, the watch that sees every Node done, and the
//! check that every block is distinct afterwards.

use super::*;

// ---------------------------------------------------------------------------
// Cluster runs

/// Runs `f` until it succeeds, retrying transport errors and 429/5xx a few times.
pub(super) async fn retry<T, F, Fut>(what: impl Fn() -> String, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = kube::Result<T>>,
{
    let mut attempt = 0u32;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < 6 && retriable(&e) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
            Err(e) => return Err(e).with_context(what),
        }
    }
}

pub(super) fn retriable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500,
        _ => true,
    }
}

pub(super) fn node_name(i: usize) -> String {
    format!("{NODE_PREFIX}{i}")
}

pub(super) async fn create_nodes(client: &Client, n: usize, concurrency: usize) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let node: Node = serde_json::from_value(json!({
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": { "name": node_name(i), "labels": { LABEL_KEY: LABEL_VALUE } },
                }))?;
                let (api, node) = (&api, &node);
                retry(
                    || format!("create Node {}", node.name_any()),
                    || async move {
                        match api.create(&PostParams::default(), node).await {
                            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                            r => r.map(|_| ()),
                        }
                    },
                )
                .await
            }
        })
        .buffer_unordered(concurrency)
        .try_for_each(|()| futures::future::ready(Ok(())))
        .await
}

pub(super) fn has_pod_cidr(node: &Node) -> bool {
    node.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()).is_some_and(|c| !c.is_empty())
}

pub(super) fn has_blocks(nnc: &NodeNetworkConfig) -> bool {
    nnc.status.as_ref().is_some_and(|s| !s.blocks.is_empty())
}

pub(super) enum Seen {
    NodeDone(String),
    NncDone(String),
    InitDone,
    Other,
}

/// Watches the bench Nodes (and NNCs); `ready` fires once the watches are
/// established, `done` with the instant the last of `n` Nodes was seen done.
pub(super) async fn watch_done(
    client: Client,
    n: usize,
    with_nnc: bool,
    progress: Arc<AtomicUsize>,
    ready: oneshot::Sender<()>,
    done: oneshot::Sender<[Instant; 3]>,
) {
    let nodes: BoxStream<Seen> = watch(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().labels(&format!("{LABEL_KEY}={LABEL_VALUE}")),
    )
    .default_backoff()
    .map(|ev| match ev {
        Ok(Event::Apply(n) | Event::InitApply(n)) if has_pod_cidr(&n) => Seen::NodeDone(n.name_any()),
        Ok(Event::InitDone) => Seen::InitDone,
        _ => Seen::Other,
    })
    .boxed();
    let nncs: BoxStream<Seen> = if with_nnc {
        watch(Api::<NodeNetworkConfig>::all(client), watcher::Config::default())
            .default_backoff()
            .map(|ev| match ev {
                Ok(Event::Apply(n) | Event::InitApply(n)) if has_blocks(&n) => Seen::NncDone(n.name_any()),
                Ok(Event::InitDone) => Seen::InitDone,
                _ => Seen::Other,
            })
            .boxed()
    } else {
        futures::stream::empty().boxed()
    };
    let full: u8 = if with_nnc { 3 } else { 1 };
    let mut inits_left = if with_nnc { 2 } else { 1 };
    let mut ready = Some(ready);
    let mut state: HashMap<String, u8> = HashMap::with_capacity(n);
    let mut count = 0;
    let (mut half, mut ninety) = (None, None);
    let mut events = futures::stream::select(nodes, nncs);
    while let Some(seen) = events.next().await {
        let (name, bit) = match seen {
            Seen::NodeDone(name) => (name, 1),
            Seen::NncDone(name) => (name, 2),
            Seen::InitDone => {
                inits_left -= 1;
                if inits_left == 0
                    && let Some(r) = ready.take()
                {
                    let _ = r.send(());
                }
                continue;
            }
            Seen::Other => continue,
        };
        let flags = state.entry(name).or_default();
        if *flags & bit == 0 {
            *flags |= bit;
            if *flags == full {
                count += 1;
                progress.store(count, Ordering::Relaxed);
                if count == n.div_ceil(2) {
                    half = Some(Instant::now());
                }
                if count == (n * 9).div_ceil(10) {
                    ninety = Some(Instant::now());
                }
                if count == n {
                    let now = Instant::now();
                    let _ = done.send([half.unwrap_or(now), ninety.unwrap_or(now), now]);
                    return;
                }
            }
        }
    }
}
