//! Devices and their models, down and up: one shared watch each on
//! `devices.outrigger.io` Devices and DeviceModels into the cache (a node
//! gets the devices bound to it and the models they name), and a device's
//! status from its node's report into the status subresource.
//!
//! A cluster without the CRDs (cloud-gw upgraded, manifests not yet
//! applied) is served without devices: cloud-gw says so and looks again
//! every 30 s, and starts the watches once the definitions are there.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::Api;
use outrigger_proto::device::{API_VERSION, GROUP, VERSION};
use outrigger_proto::report::DeviceReport;
use serde_json::json;

use super::cache::{Cache, Kind};
use super::nodes::is_status;
use super::report::{outcome, Outcome};
use super::{follow, lock, watcher, Change, Inner};

pub(crate) fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: API_VERSION.into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn devices() -> ApiResource {
    resource("Device", "devices")
}

fn models() -> ApiResource {
    resource("DeviceModel", "devicemodels")
}

/// Start following devices and models once their definitions exist; until
/// then (or if they never do) count both watches as listed, with nothing.
pub(crate) async fn run(inner: Arc<Inner>) {
    let probe = Api::<DynamicObject>::all_with(inner.client.clone(), &models());
    let mut said = false;
    loop {
        match probe.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => break,
            Err(e) if is_status(&e, 404) => {
                if !said {
                    tracing::warn!(
                        group = GROUP,
                        "the device definitions are not installed (cloud-gw manifests | kubectl apply -f -): serving without devices until they are"
                    );
                    said = true;
                    inner.ready.send_modify(|n| *n += 2);
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for the device definitions; again in 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
    // Listed as empty before: the watches' first lists must not count again.
    let counted = said;
    let client = inner.client.clone();
    let m = watcher(
        Api::<DynamicObject>::all_with(client.clone(), &models()),
        Default::default(),
    );
    tokio::spawn(follow(
        inner.clone(),
        "devicemodels",
        m,
        |c| c.config_keys(Kind::DeviceModel),
        |c: &mut Cache, e| match e {
            Change::Put(o) => match serde_json::to_value(&o) {
                Ok(v) => c.put_config(Kind::DeviceModel, v),
                Err(_) => Vec::new(),
            },
            Change::Gone(k) => c.remove_config(Kind::DeviceModel, &k),
        },
        counted,
    ));
    let d = watcher(
        Api::<DynamicObject>::all_with(client, &devices()),
        Default::default(),
    );
    follow(
        inner,
        "devices",
        d,
        Cache::device_keys,
        |c: &mut Cache, e| match e {
            Change::Put(o) => match serde_json::to_value(&o) {
                Ok(v) => c.put_device(v),
                Err(_) => Vec::new(),
            },
            Change::Gone(k) => c.remove_device(&k),
        },
        counted,
    )
    .await;
}

/// A device's status, written if the device is bound to `node` (by the
/// cache, whatever the row claims) and still the one the row is about.
pub(crate) async fn status(inner: &Arc<Inner>, node: &str, report: DeviceReport) -> Outcome {
    let own = {
        let c = lock(&inner.cache);
        c.device_by_uid(&report.uid)
            .filter(|(_, d)| d.node == node)
            .map(|(k, _)| k.clone())
    };
    let Some((ns, name)) = own else {
        if report.namespace.is_empty() || report.name.is_empty() {
            tracing::warn!(
                node,
                uid = report.uid,
                "a device report without a name; dropped"
            );
        }
        return Outcome::Done;
    };
    let api = Api::<DynamicObject>::namespaced_with(inner.client.clone(), &ns, &devices());
    // The uid makes the patch conditional: a device recreated under the
    // same name does not get the old one's readings.
    let patch = json!({"metadata": {"uid": report.uid}, "status": report.status});
    let r = api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ());
    let r = match r {
        Ok(()) => take_local_desired(&api, &name, &report).await,
        r => r,
    };
    match r {
        Err(e) if is_status(&e, 404) || is_status(&e, 409) => Outcome::Done,
        r => outcome("device status", node, r),
    }
}

/// Desired values an operator set at the node, into the spec: each only
/// if the spec still has the value it was set over (read, compare, and a
/// patch conditional on the resourceVersion read, so a user's change in
/// between wins). A lost race is not retried here: the node keeps
/// reporting the value until the spec has it or changes.
async fn take_local_desired(
    api: &Api<DynamicObject>,
    name: &str,
    report: &DeviceReport,
) -> kube::Result<()> {
    let set: Vec<_> = report
        .status
        .properties
        .iter()
        .filter_map(|p| p.local_desired.as_ref().map(|l| (&p.name, l)))
        .collect();
    if set.is_empty() {
        return Ok(());
    }
    let o = api.get(name).await?;
    if o.metadata.uid.as_deref() != Some(report.uid.as_str()) {
        return Ok(());
    }
    let mut props = o.data["spec"]["properties"].clone();
    let mut taken = Vec::new();
    for (prop, l) in set {
        let Some(p) = props
            .as_array_mut()
            .and_then(|a| a.iter_mut().find(|p| p["name"] == prop.as_str()))
        else {
            continue;
        };
        if l.holds_over(p["desired"].as_str()) {
            p["desired"] = l.value.clone().into();
            taken.push(format!("{prop}={}", l.value));
        }
    }
    if taken.is_empty() {
        return Ok(());
    }
    let patch = json!({
        "metadata": {"resourceVersion": o.metadata.resource_version},
        "spec": {"properties": props},
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    tracing::info!(
        namespace = o.metadata.namespace.as_deref().unwrap_or_default(),
        device = name,
        values = %taken.join(", "),
        "desired values set at the node written into the spec"
    );
    Ok(())
}
