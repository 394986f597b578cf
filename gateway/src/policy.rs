//! Who may use which VM: pure decisions.
//!
//! A user sees a VM only if the gateway's policy allows it (by vmid, pool or tag) *and* Proxmox
//! lists it for the gateway's token (so the token's own ACLs are an upper bound). Templates and
//! containers are never offered. Unknown and forbidden VMs get the same answer, so a user cannot
//! probe which VM ids exist.
use zerospice_proto::{ErrorCode, VmId, WireError};

use crate::proxmox::Guest;
use crate::store::UserPolicy;

pub fn may_use(policy: &UserPolicy, g: &Guest) -> bool {
    g.kind == "qemu"
        && !g.template
        && (policy.vms.contains(&g.vmid.get())
            || g.pool.as_ref().is_some_and(|p| policy.pools.contains(p))
            || g.tags.iter().any(|t| policy.tags.contains(t)))
}

/// The VMs a user may see, by vmid.
pub fn visible<'a>(policy: &UserPolicy, guests: &'a [Guest]) -> Vec<&'a Guest> {
    let mut v: Vec<&Guest> = guests.iter().filter(|g| may_use(policy, g)).collect();
    v.sort_by_key(|g| g.vmid);
    v
}

pub fn not_available(vmid: VmId) -> WireError {
    WireError::new(
        ErrorCode::NotAllowed,
        format!("VM {vmid} does not exist or is not available to you"),
    )
}

/// The VM, if this user may use it.
pub fn find<'a>(
    policy: &UserPolicy,
    guests: &'a [Guest],
    vmid: VmId,
) -> Result<&'a Guest, WireError> {
    guests
        .iter()
        .find(|g| g.vmid == vmid && may_use(policy, g))
        .ok_or_else(|| not_available(vmid))
}

/// Power actions need the grant (off by default).
pub fn may_power(policy: &UserPolicy, vmid: VmId) -> Result<(), WireError> {
    if policy.power {
        Ok(())
    } else {
        Err(WireError::new(
            ErrorCode::NotAllowed,
            format!(
                "you may not start or shut down VM {vmid}: ask your administrator for power rights"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(vmid: u32, pool: Option<&str>, tags: &[&str]) -> Guest {
        Guest {
            vmid: VmId::new(vmid).unwrap(),
            kind: "qemu".into(),
            name: format!("vm{vmid}"),
            node: "pve".into(),
            status: "running".into(),
            template: false,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            pool: pool.map(str::to_owned),
        }
    }

    #[test]
    fn by_vmid_pool_or_tag() {
        let guests = vec![
            g(100, None, &[]),
            g(101, Some("lab"), &[]),
            g(102, None, &["desk", "x"]),
            g(103, Some("prod"), &["srv"]),
        ];
        let p = UserPolicy {
            vms: vec![100],
            pools: vec!["lab".into()],
            tags: vec!["desk".into()],
            ..Default::default()
        };
        let ids: Vec<u32> = visible(&p, &guests).iter().map(|g| g.vmid.get()).collect();
        assert_eq!(ids, [100, 101, 102]);
        assert!(visible(&UserPolicy::default(), &guests).is_empty());
        // A forbidden VM and a VM that does not exist get the same answer.
        let forbidden = find(&p, &guests, VmId::new(103).unwrap()).unwrap_err();
        let absent = find(&p, &guests[..3], VmId::new(103).unwrap()).unwrap_err();
        assert_eq!(forbidden, absent);
        assert_eq!(
            find(&p, &guests, VmId::new(999).unwrap())
                .unwrap_err()
                .message,
            "VM 999 does not exist or is not available to you"
        );
    }

    #[test]
    fn the_token_is_an_upper_bound_and_templates_are_hidden() {
        // 104 is allowed by policy but Proxmox did not list it for the token.
        let guests = vec![g(100, None, &[])];
        let p = UserPolicy {
            vms: vec![100, 104],
            ..Default::default()
        };
        assert_eq!(visible(&p, &guests).len(), 1);
        let mut t = g(100, None, &[]);
        t.template = true;
        assert!(!may_use(&p, &t));
        let mut c = g(100, None, &[]);
        c.kind = "lxc".into();
        assert!(!may_use(&p, &c));
    }

    #[test]
    fn power_needs_the_grant() {
        let vm = VmId::new(100).unwrap();
        assert_eq!(
            may_power(&UserPolicy::default(), vm).unwrap_err().message,
            "you may not start or shut down VM 100: ask your administrator for power rights"
        );
        assert!(may_power(
            &UserPolicy {
                power: true,
                ..Default::default()
            },
            vm
        )
        .is_ok());
    }
}
