//! The raw contender: carve's writes for every Node with no allocation logic, the write limit
//! carve is measured against.

use super::*;

pub(super) fn raw_block(name: &str) -> Result<(String, String)> {
    let i: u32 = name.strip_prefix(NODE_PREFIX).and_then(|s| s.parse().ok()).context("not a bench node")?;
    let (b, c) = ((i >> 8) & 0xff, i & 0xff);
    Ok((format!("10.{b}.{c}.0/{BLOCK_PREFIX}"), format!("10.{b}.{c}.1")))
}

/// carve's writes for one Node, without allocation logic: create its NNC,
/// apply the NNC status, apply the Node's podCIDR.
pub(super) async fn raw_writes(client: Client, name: String, uid: String) -> Result<()> {
    let (cidr, gateway) = raw_block(&name)?;
    let nnc_api: Api<NodeNetworkConfig> = Api::all(client.clone());
    let node_api: Api<Node> = Api::all(client);
    let mut nnc = NodeNetworkConfig::new(&name, NodeNetworkConfigSpec::default());
    nnc.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: name.clone(),
        uid,
        controller: Some(true),
        block_owner_deletion: None,
    }]);
    let (nnc_api, node_api, nnc, name) = (&nnc_api, &node_api, &nnc, name.as_str());
    let created = retry(
        || format!("create NNC {name}"),
        || async move {
            let pp = PostParams { field_manager: Some(RAW_MANAGER.into()), ..Default::default() };
            match nnc_api.create(&pp, nnc).await {
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
                r => r.map(Some),
            }
        },
    )
    .await?;
    let generation = created.and_then(|c| c.metadata.generation);
    let status = NodeNetworkConfigStatus {
        pool: Some(POOL.into()),
        mode: Some(PoolMode::Overlay),
        // An allocation ID of the same length as carve's.
        blocks: vec![NodeBlock {
            cidr: cidr.clone(),
            family: IpFamily::IPv4,
            gateway: Some(gateway.clone()),
            allocation_id: Some(format!("{:016x}", cidr.len() as u64 ^ 0x5eed_0000_0000_0000)),
        }],
        block_cidrs: Some(cidr.clone()),
        gateway: Some(gateway),
        node_ip: None,
        strategy: Some(Default::default()),
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "BlocksCarved".into(),
            message: format!("{cidr} carved from pool {POOL}"),
            observed_generation: generation,
            last_transition_time: Time(Timestamp::now()),
        }],
        observed_generation: generation,
        ..Default::default()
    };
    // The same kind of writes carve makes: server-side apply, forced, under one field manager.
    let apply = PatchParams::apply(RAW_MANAGER).force();
    let status_patch = Patch::Apply(json!({
        "apiVersion": "carve.dev/v1alpha1",
        "kind": "NodeNetworkConfig",
        "metadata": { "name": name },
        "status": status,
    }));
    let (status_patch, apply) = (&status_patch, &apply);
    retry(
        || format!("apply NNC status {name}"),
        || async move { nnc_api.patch_status(name, apply, status_patch).await.map(|_| ()) },
    )
    .await?;
    let node_patch = Patch::Apply(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name },
        "spec": { "podCIDR": cidr, "podCIDRs": [cidr] },
    }));
    let node_patch = &node_patch;
    retry(|| format!("apply Node {name}"), || async move { node_api.patch(name, apply, node_patch).await.map(|_| ()) })
        .await
}

/// The raw contender: a Node watch feeding `concurrency` Nodes' writes at a time.
pub(super) async fn raw_writer(
    client: Client,
    concurrency: usize,
    ready: oneshot::Sender<()>,
    errors: Arc<AtomicUsize>,
) {
    let (tx, rx) = futures::channel::mpsc::unbounded::<(String, String)>();
    let feed_client = client.clone();
    let feeder = async move {
        let mut ready = Some(ready);
        let mut seen: HashSet<String> = HashSet::new();
        let cfg = watcher::Config::default().labels(&format!("{LABEL_KEY}={LABEL_VALUE}"));
        let mut nodes = watch(Api::<Node>::all(feed_client), cfg).default_backoff().boxed();
        while let Some(ev) = nodes.next().await {
            match ev {
                Ok(Event::Apply(node) | Event::InitApply(node))
                    if !has_pod_cidr(&node) && seen.insert(node.name_any()) =>
                {
                    let _ = tx.unbounded_send((node.name_any(), node.uid().unwrap_or_default()));
                }
                Ok(Event::InitDone) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                _ => {}
            }
        }
    };
    let writer =
        rx.map(|(name, uid)| raw_writes(client.clone(), name, uid)).buffer_unordered(concurrency).for_each(|r| {
            if let Err(e) = r
                && errors.fetch_add(1, Ordering::Relaxed) < 5
            {
                eprintln!("raw writer: {e:#}");
            }
            futures::future::ready(())
        });
    futures::join!(feeder, writer);
}
