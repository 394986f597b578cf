//! The stand-in's mutable world (guests, tasks, faults, records) behind one mutex.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::certs::ClusterPki;
use super::config::{Acl, GuestKind, PveConfig, VmDef, VmStatus};
use super::ticket::TicketKey;
use super::{ApiCall, Fault, IssuedTicket, ProxyConnect};

/// Everything the servers share. Immutable parts outside the mutex.
pub struct Shared {
    pub node: String,
    pub token_id: String,
    pub token_secret: String,
    pub power_delay: Duration,
    pub auth_failure_delay: Duration,
    pub pki: ClusterPki,
    pub ticket_key: TicketKey,
    state: Mutex<State>,
}

impl Shared {
    pub fn new(config: &PveConfig, pki: ClusterPki, started: SystemTime) -> Self {
        let vms = config
            .vms
            .iter()
            .map(|def| {
                let mut def = def.clone();
                if def.node.is_empty() {
                    def.node = config.node.clone();
                }
                let running_since = (def.status == VmStatus::Running).then_some(started);
                (def.vmid, Vm { def, running_since })
            })
            .collect();
        Shared {
            node: config.node.clone(),
            token_id: config.token_id.clone(),
            token_secret: config.token_secret.clone(),
            power_delay: config.power_delay,
            auth_failure_delay: config.auth_failure_delay,
            pki,
            ticket_key: TicketKey::generate(),
            state: Mutex::new(State {
                vms,
                acls: config.privileges.clone(),
                tasks: BTreeMap::new(),
                calls: Vec::new(),
                connects: Vec::new(),
                tickets: Vec::new(),
                faults: Vec::new(),
                next_pid: 0x1000 + u32::from(super::random_bytes::<1>()[0]) * 16,
                next_connect_id: 1,
            }),
        }
    }

    /// The state; a panic elsewhere while holding the lock does not poison the stand-in.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub struct State {
    pub vms: BTreeMap<u32, Vm>,
    pub acls: Vec<Acl>,
    pub tasks: BTreeMap<String, Task>,
    pub calls: Vec<ApiCall>,
    pub connects: Vec<ProxyConnect>,
    pub tickets: Vec<IssuedTicket>,
    pub faults: Vec<ScopedFault>,
    pub next_pid: u32,
    pub next_connect_id: u64,
}

pub struct Vm {
    pub def: VmDef,
    pub running_since: Option<SystemTime>,
}

impl Vm {
    pub fn uptime(&self, now: SystemTime) -> u64 {
        self.running_since
            .and_then(|since| now.duration_since(since).ok())
            .map_or(0, |d| d.as_secs())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerAction {
    Start,
    Shutdown,
    Stop,
    Reboot,
}

impl PowerAction {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "start" => Some(PowerAction::Start),
            "shutdown" => Some(PowerAction::Shutdown),
            "stop" => Some(PowerAction::Stop),
            "reboot" => Some(PowerAction::Reboot),
            _ => None,
        }
    }

    /// The worker type in the UPID.
    pub fn task_type(self) -> &'static str {
        match self {
            PowerAction::Start => "qmstart",
            PowerAction::Shutdown => "qmshutdown",
            PowerAction::Stop => "qmstop",
            PowerAction::Reboot => "qmreboot",
        }
    }
}

pub struct Task {
    pub upid: String,
    pub node: String,
    pub pid: u32,
    pub pstart: u32,
    pub starttime: u64,
    pub vmid: u32,
    pub action: PowerAction,
    pub authid: String,
    pub ends_at: SystemTime,
    /// `Ok` or the `TASK ERROR` text.
    pub outcome: Result<(), String>,
    pub applied: bool,
}

pub struct ScopedFault {
    pub fault: Fault,
    /// `None`: every path; otherwise a prefix of the API path (`/nodes/pve/...`, with or
    /// without `/api2/json`).
    pub scope: Option<String>,
}

impl ScopedFault {
    pub fn applies_to(&self, full_path: &str) -> bool {
        let Some(scope) = &self.scope else {
            return true;
        };
        if scope.starts_with("/api2/") {
            return full_path.starts_with(scope.as_str());
        }
        full_path
            .strip_prefix("/api2/json")
            .is_some_and(|rel| rel.starts_with(scope.as_str()))
    }
}

impl State {
    /// Finishes tasks whose time has come, applying their effect on the guest.
    pub fn advance(&mut self, now: SystemTime) {
        for task in self.tasks.values_mut() {
            if task.applied || now < task.ends_at {
                continue;
            }
            task.applied = true;
            if task.outcome.is_err() {
                continue;
            }
            let Some(vm) = self.vms.get_mut(&task.vmid) else {
                continue;
            };
            match task.action {
                PowerAction::Start | PowerAction::Reboot => {
                    vm.def.status = VmStatus::Running;
                    vm.running_since = Some(task.ends_at);
                }
                PowerAction::Shutdown | PowerAction::Stop => {
                    vm.def.status = VmStatus::Stopped;
                    vm.running_since = None;
                }
            }
        }
    }

    pub fn fault(&self, full_path: &str, pick: impl Fn(&Fault) -> bool) -> Option<&Fault> {
        self.faults
            .iter()
            .find(|f| pick(&f.fault) && f.applies_to(full_path))
            .map(|f| &f.fault)
    }

    pub fn has_fault(&self, pick: impl Fn(&Fault) -> bool) -> bool {
        self.faults.iter().any(|f| pick(&f.fault))
    }

    pub fn pool_of(&self, vmid: u32) -> Option<String> {
        self.vms.get(&vmid).and_then(|vm| vm.def.pool.clone())
    }

    /// The node names of the cluster: the stand-in's and every guest's.
    pub fn cluster_nodes(&self, own: &str) -> BTreeSet<String> {
        let mut nodes: BTreeSet<String> = self.vms.values().map(|vm| vm.def.node.clone()).collect();
        nodes.insert(own.to_owned());
        nodes
    }

    /// The QEMU guest `vmid` if its config lives on `node` (`load_config($vmid, $node)`).
    pub fn qemu_on(&self, node: &str, vmid: u32) -> Option<&Vm> {
        self.vms
            .get(&vmid)
            .filter(|vm| vm.def.kind == GuestKind::Qemu && vm.def.node == node)
    }
}

pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
