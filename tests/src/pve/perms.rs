//! Privilege evaluation over the token's ACL, a simple model of `PVE::RPCEnvironment::permissions`.
//! No IO.

use std::collections::BTreeMap;

use super::config::Acl;

/// The top-level paths `get_effective_permissions` always looks at.
const DEFAULT_PATHS: [&str; 8] = [
    "/",
    "/access",
    "/access/groups",
    "/nodes",
    "/pool",
    "/sdn",
    "/storage",
    "/vms",
];

/// Collapses repeated slashes and drops a trailing one (`normalize_path`).
pub fn normalize(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    format!("/{}", parts.join("/"))
}

/// Privileges on `path`, each with its propagate flag (what `/access/permissions` shows as 1/0).
///
/// An entry applies to its own path, and to paths below it if it propagates. For `/vms/{id}` the
/// privileges of `/pool/{pool}` are added when the guest is in a pool.
pub fn privileges_at(
    acls: &[Acl],
    path: &str,
    pool_of: impl Fn(u32) -> Option<String>,
) -> BTreeMap<String, bool> {
    let path = normalize(path);
    let mut out = tree_privileges(acls, &path);
    if let Some(pool) = path
        .strip_prefix("/vms/")
        .and_then(|id| id.parse::<u32>().ok())
        .and_then(pool_of)
    {
        for (privilege, propagate) in tree_privileges(acls, &format!("/pool/{pool}")) {
            let entry = out.entry(privilege).or_insert(false);
            *entry |= propagate;
        }
    }
    out
}

fn tree_privileges(acls: &[Acl], path: &str) -> BTreeMap<String, bool> {
    let mut out = BTreeMap::new();
    for acl in acls {
        let acl_path = normalize(&acl.path);
        let exact = acl_path == path;
        let inherited = acl.propagate
            && !exact
            && (acl_path == "/" || path.starts_with(&format!("{acl_path}/")));
        if !(exact || inherited) {
            continue;
        }
        // Inherited privileges only come from propagating entries, so they show as 1.
        let propagate = acl.propagate;
        for privilege in &acl.privs {
            let entry = out.entry(privilege.clone()).or_insert(false);
            *entry |= propagate;
        }
    }
    out
}

/// Whether `privilege` is granted on `path`.
pub fn has(
    acls: &[Acl],
    path: &str,
    privilege: &str,
    pool_of: impl Fn(u32) -> Option<String>,
) -> bool {
    privileges_at(acls, path, pool_of).contains_key(privilege)
}

/// `GET /access/permissions` without `path`: every default path, ACL path and pooled guest path
/// where the token holds something.
pub fn effective(
    acls: &[Acl],
    pooled_vmids: &[u32],
    pool_of: impl Fn(u32) -> Option<String>,
) -> BTreeMap<String, BTreeMap<String, bool>> {
    let mut paths: Vec<String> = DEFAULT_PATHS.iter().map(|p| (*p).to_owned()).collect();
    paths.extend(acls.iter().map(|a| normalize(&a.path)));
    paths.extend(pooled_vmids.iter().map(|id| format!("/vms/{id}")));
    let mut out = BTreeMap::new();
    for path in paths {
        let privs = privileges_at(acls, &path, &pool_of);
        if !privs.is_empty() {
            out.insert(path, privs);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_of(vmid: u32) -> Option<String> {
        (vmid == 102).then(|| "lab".to_owned())
    }

    #[test]
    fn normalize_collapses_slashes() {
        assert_eq!(normalize("//vms///100/"), "/vms/100");
        assert_eq!(normalize(""), "/");
        assert_eq!(normalize("/"), "/");
    }

    #[test]
    fn vm_privileges_come_from_vm_vms_root_and_pool() {
        let acls = vec![
            Acl::new("/vms/100", &["VM.Audit"]),
            Acl::new("/pool/lab", &["VM.Console"]),
        ];
        assert!(has(&acls, "/vms/100", "VM.Audit", pool_of));
        assert!(!has(&acls, "/vms/101", "VM.Audit", pool_of));
        assert!(has(&acls, "/vms/102", "VM.Console", pool_of));
        assert!(!has(&acls, "/vms/102", "VM.Audit", pool_of));

        let vms = vec![Acl::new("/vms", &["VM.Audit"])];
        assert!(has(&vms, "/vms/555", "VM.Audit", pool_of));
        let root = vec![Acl::new("/", &["VM.Console"])];
        assert!(has(&root, "/vms/555", "VM.Console", pool_of));
        assert!(has(&root, "/pool/x", "VM.Console", pool_of));
    }

    #[test]
    fn non_propagating_entries_stay_on_their_path() {
        let acls = vec![Acl {
            path: "/vms".into(),
            privs: vec!["VM.Audit".into()],
            propagate: false,
        }];
        assert!(has(&acls, "/vms", "VM.Audit", pool_of));
        assert!(!has(&acls, "/vms/100", "VM.Audit", pool_of));
        assert!(!privileges_at(&acls, "/vms", pool_of)["VM.Audit"]);
    }

    #[test]
    fn effective_lists_only_paths_with_privileges() {
        let acls = vec![
            Acl::new("/vms/100", &["VM.Audit", "VM.Console"]),
            Acl::new("/pool/lab", &["VM.Audit"]),
        ];
        let eff = effective(&acls, &[102], pool_of);
        assert_eq!(
            eff.keys().cloned().collect::<Vec<_>>(),
            vec!["/pool/lab", "/vms/100", "/vms/102"]
        );
        assert!(eff["/vms/100"]["VM.Console"]);
        assert_eq!(eff["/vms/102"].len(), 1);
    }
}
