//! Which devices a pod gets: pure, from what the node has, what others
//! hold and what the pod asks for. Extended resources are whole numbers
//! asked per container (limits, as the API server requires them equal to
//! any request); app containers get their own devices, and init containers
//! reuse the pod's, as the kubelet's device manager does, so a pod holds
//! max(the largest init container's ask, the app containers' sum).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, Pod};

use super::detect::Accelerator;
use crate::store::Allocation;

/// A container's ask for one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub container: String,
    pub resource: String,
    pub count: u32,
    pub init: bool,
}

/// Why a pod cannot have what it asks for now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Shortage {
    #[error("insufficient {resource}: the pod asks for {wanted}, {free} of {total} free on this node{held}", held = held_by(.holders))]
    Insufficient {
        resource: String,
        wanted: u32,
        free: u32,
        total: u32,
        /// Pods (uids) holding the rest.
        holders: Vec<String>,
    },
    #[error("{resource}: {detail}")]
    BadRequest { resource: String, detail: String },
}

fn held_by(h: &[String]) -> String {
    if h.is_empty() {
        String::new()
    } else {
        format!(" (held by pod {})", h.join(", "))
    }
}

/// The pod's asks for the resources `known` says are accelerators.
pub fn wants(pod: &Pod, known: &dyn Fn(&str) -> bool) -> Result<Vec<Want>, Shortage> {
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut each = |c: &Container, init: bool| -> Result<(), Shortage> {
        let Some(r) = c.resources.as_ref() else {
            return Ok(());
        };
        let mut names: BTreeSet<&String> = BTreeSet::new();
        names.extend(r.limits.iter().flatten().map(|(k, _)| k));
        names.extend(r.requests.iter().flatten().map(|(k, _)| k));
        for name in names {
            if !known(name) {
                continue;
            }
            let q = r
                .limits
                .as_ref()
                .and_then(|l| l.get(name))
                .or_else(|| r.requests.as_ref().and_then(|l| l.get(name)));
            let Some(q) = q else { continue };
            let count: u32 = q.0.trim().parse().map_err(|_| Shortage::BadRequest {
                resource: name.clone(),
                detail: format!(
                    "container {:?} asks for {:?}; extended resources are whole numbers",
                    c.name, q.0
                ),
            })?;
            if count > 0 {
                out.push(Want {
                    container: c.name.clone(),
                    resource: name.clone(),
                    count,
                    init,
                });
            }
        }
        Ok(())
    };
    for c in spec.init_containers.iter().flatten() {
        each(c, true)?;
    }
    for c in &spec.containers {
        each(c, false)?;
    }
    Ok(out)
}

/// Slots for the pod's wants, from those not in `held` (others' slots),
/// or the first resource that falls short. Devices nobody holds go first,
/// then the lowest ids: exclusive use where the node has room.
pub fn assign(
    inventory: &[Accelerator],
    held: &[Allocation],
    pod_uid: &str,
    wants: &[Want],
) -> Result<Vec<Allocation>, Shortage> {
    let mut out = Vec::new();
    let resources: BTreeSet<&str> = wants.iter().map(|w| w.resource.as_str()).collect();
    for resource in resources {
        let app: Vec<&Want> = wants
            .iter()
            .filter(|w| w.resource == resource && !w.init)
            .collect();
        let app_sum: u32 = app.iter().map(|w| w.count).sum();
        let init_max = wants
            .iter()
            .filter(|w| w.resource == resource && w.init)
            .max_by_key(|w| w.count);
        // Slots each container takes (app containers their own; the
        // biggest init container whatever the apps leave it short of).
        let mut takers: Vec<(&str, u32)> = app
            .iter()
            .map(|w| (w.container.as_str(), w.count))
            .collect();
        if let Some(i) = init_max {
            if i.count > app_sum {
                takers.push((i.container.as_str(), i.count - app_sum));
            }
        }
        let need: u32 = takers.iter().map(|t| t.1).sum();
        let devices: Vec<&Accelerator> = inventory
            .iter()
            .filter(|a| a.resource == resource)
            .collect();
        let total: u32 = devices.iter().map(|a| a.shares).sum();
        let others: Vec<&Allocation> = held
            .iter()
            .filter(|h| h.resource == resource && h.pod_uid != pod_uid)
            .collect();
        let mut load: BTreeMap<&str, u32> = BTreeMap::new();
        for h in &others {
            *load.entry(h.device.as_str()).or_default() += 1;
        }
        let mut free: Vec<(u32, &str, u32)> = Vec::new();
        for d in &devices {
            for slot in 0..d.shares {
                if !others.iter().any(|h| h.device == d.id && h.slot == slot) {
                    free.push((
                        load.get(d.id.as_str()).copied().unwrap_or(0),
                        d.id.as_str(),
                        slot,
                    ));
                }
            }
        }
        if (free.len() as u32) < need {
            let mut holders: Vec<String> = others.iter().map(|h| h.pod_uid.clone()).collect();
            holders.sort();
            holders.dedup();
            return Err(Shortage::Insufficient {
                resource: resource.into(),
                wanted: need,
                free: free.len() as u32,
                total,
                holders,
            });
        }
        // Spread: one slot per device per round, least loaded first.
        free.sort();
        let mut rounds: Vec<(u32, &str, u32)> = Vec::new();
        let mut taken: BTreeSet<(&str, u32)> = BTreeSet::new();
        while rounds.len() < free.len() {
            let mut seen: BTreeSet<&str> = BTreeSet::new();
            for f in &free {
                if !taken.contains(&(f.1, f.2)) && seen.insert(f.1) {
                    taken.insert((f.1, f.2));
                    rounds.push(*f);
                }
            }
        }
        let mut next = rounds.into_iter();
        for (container, n) in takers {
            for _ in 0..n {
                if let Some((_, device, slot)) = next.next() {
                    out.push(Allocation {
                        resource: resource.into(),
                        device: device.into(),
                        slot,
                        pod_uid: pod_uid.into(),
                        container: container.into(),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// The devices of `resource` one container uses: its own slots, or for an
/// init container the first `count` of the pod's.
pub fn devices_for<'a>(pod_slots: &'a [Allocation], want: &Want) -> Vec<&'a str> {
    let mut own: Vec<&str> = pod_slots
        .iter()
        .filter(|a| a.resource == want.resource && (want.init || a.container == want.container))
        .map(|a| a.device.as_str())
        .collect();
    own.dedup();
    own.truncate(want.count as usize);
    own
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn gpus(n: u32, shares: u32) -> Vec<Accelerator> {
        (0..n)
            .map(|i| Accelerator {
                resource: "nvidia.com/gpu".into(),
                id: i.to_string(),
                nodes: vec![],
                shares,
                env: vec![],
            })
            .collect()
    }

    fn want(c: &str, n: u32, init: bool) -> Want {
        Want {
            container: c.into(),
            resource: "nvidia.com/gpu".into(),
            count: n,
            init,
        }
    }

    fn container(name: &str, gpus: &str) -> Container {
        Container {
            name: name.into(),
            resources: Some(ResourceRequirements {
                limits: Some([("nvidia.com/gpu".to_string(), Quantity(gpus.into()))].into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn asks_come_from_limits_of_known_resources() {
        let mut pod = Pod {
            spec: Some(Default::default()),
            ..Default::default()
        };
        let spec = pod.spec.as_mut().unwrap();
        spec.containers = vec![container("a", "2"), container("b", "0")];
        spec.init_containers = Some(vec![container("i", "1")]);
        let w = wants(&pod, &|r| r == "nvidia.com/gpu").unwrap();
        assert_eq!(w, [want("i", 1, true), want("a", 2, false)]);
        assert!(wants(&pod, &|_| false).unwrap().is_empty());
        pod.spec.as_mut().unwrap().containers = vec![container("a", "500m")];
        assert!(matches!(
            wants(&pod, &|_| true),
            Err(Shortage::BadRequest { .. })
        ));
    }

    #[test]
    fn each_app_container_gets_its_own_and_init_containers_reuse_them() {
        let inv = gpus(4, 1);
        let got = assign(
            &inv,
            &[],
            "p",
            &[want("i", 3, true), want("a", 1, false), want("b", 1, false)],
        )
        .unwrap();
        // 3 slots: a and b one each, the init container the one more it needs.
        let by: Vec<(&str, &str)> = got
            .iter()
            .map(|a| (a.container.as_str(), a.device.as_str()))
            .collect();
        assert_eq!(by, [("a", "0"), ("b", "1"), ("i", "2")]);
        assert_eq!(devices_for(&got, &want("i", 3, true)), ["0", "1", "2"]);
        assert_eq!(devices_for(&got, &want("b", 1, false)), ["1"]);
    }

    #[test]
    fn held_devices_are_never_given_and_a_shortage_names_the_holders() {
        let inv = gpus(2, 1);
        let first = assign(&inv, &[], "p1", &[want("a", 1, false)]).unwrap();
        assert_eq!(first[0].device, "0");
        let second = assign(&inv, &first, "p2", &[want("a", 1, false)]).unwrap();
        assert_eq!(second[0].device, "1");
        let held: Vec<Allocation> = first.into_iter().chain(second).collect();
        let e = assign(&inv, &held, "p3", &[want("a", 1, false)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "insufficient nvidia.com/gpu: the pod asks for 1, 0 of 2 free on this node (held by pod p1, p2)"
        );
        // A pod's own slots do not count against it (a restart re-asks).
        assert!(assign(&inv, &held, "p1", &[want("a", 1, false)]).is_ok());
    }

    #[test]
    fn shared_devices_spread_before_doubling_up() {
        let inv = gpus(2, 2);
        let got = assign(&inv, &[], "p", &[want("a", 3, false)]).unwrap();
        let slots: Vec<(&str, u32)> = got.iter().map(|a| (a.device.as_str(), a.slot)).collect();
        assert_eq!(slots, [("0", 0), ("1", 0), ("0", 1)]);
        let more = assign(&inv, &got, "q", &[want("a", 1, false)]).unwrap();
        assert_eq!((more[0].device.as_str(), more[0].slot), ("1", 1));
    }

    #[test]
    fn a_resource_the_node_lacks_is_a_shortage_of_zero() {
        let e = assign(&[], &[], "p", &[want("a", 1, false)]).unwrap_err();
        assert!(matches!(e, Shortage::Insufficient { total: 0, .. }));
    }
}
