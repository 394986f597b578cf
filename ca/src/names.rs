//! User and device names: the only identities a certificate can carry.
//!
//! Both appear in a certificate's subject and SAN URI, in file names and in logs, so they are
//! restricted to a conservative alphabet. That alone refuses commas, NUL, `*` wildcards, slashes,
//! spaces and look-alike Unicode.
use std::fmt;
use std::str::FromStr;

pub const MAX_NAME_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} name is empty")]
    Empty { what: &'static str },
    #[error("{what} name is longer than {MAX_NAME_LEN} characters")]
    TooLong { what: &'static str },
    #[error("{what} name {shown:?} contains {bad:?}: use {allowed}")]
    BadChar {
        what: &'static str,
        shown: String,
        bad: char,
        allowed: &'static str,
    },
    #[error("{what} name must start with a letter or digit")]
    BadStart { what: &'static str },
}

const USER_ALLOWED: &str = "lowercase letters, digits, '.', '_' and '-'";
const DEVICE_ALLOWED: &str = "letters, digits, '.', '_' and '-'";

fn check(
    what: &'static str,
    s: &str,
    allowed: &'static str,
    ok: fn(char) -> bool,
) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty { what });
    }
    if s.chars().count() > MAX_NAME_LEN {
        return Err(NameError::TooLong { what });
    }
    if let Some(bad) = s.chars().find(|c| !ok(*c)) {
        return Err(NameError::BadChar {
            what,
            shown: s.chars().take(MAX_NAME_LEN).collect(),
            bad,
            allowed,
        });
    }
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(NameError::BadStart { what });
    }
    Ok(())
}

/// A ZeroSpice user name: 1-64 of `a-z 0-9 . _ -`, starting with a letter or digit.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserName(String);

/// A device name: 1-64 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceName(String);

impl UserName {
    pub fn new(s: &str) -> Result<Self, NameError> {
        check("user", s, USER_ALLOWED, |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
        })?;
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl DeviceName {
    pub fn new(s: &str) -> Result<Self, NameError> {
        check("device", s, DEVICE_ALLOWED, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
        })?;
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// A device name derived from a host name, replacing what is not allowed.
    pub fn sanitized(host: &str) -> Self {
        let mut s: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .take(MAX_NAME_LEN)
            .collect();
        if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            s.insert(0, 'd');
            s.truncate(MAX_NAME_LEN);
        }
        Self(s)
    }
}

macro_rules! name_impls {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
        impl FromStr for $t {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }
    };
}
name_impls!(UserName);
name_impls!(DeviceName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for n in ["alice", "bob.smith", "a", "x-1_2", &"a".repeat(64)] {
            assert!(UserName::new(n).is_ok(), "{n}");
        }
        assert!(DeviceName::new("Alice-Laptop.lan").is_ok());
    }

    #[test]
    fn refuses_dangerous_names() {
        let e = |s: &str| UserName::new(s).unwrap_err().to_string();
        assert_eq!(e(""), "user name is empty");
        assert_eq!(
            e("alice,O=Evil"),
            "user name \"alice,O=Evil\" contains ',': use lowercase letters, digits, '.', '_' and '-'"
        );
        assert!(e("al\0ice").contains("'\\0'"));
        assert!(e("*").contains("'*'"));
        assert!(e("Alice").contains("'A'"));
        assert!(e("ali ce").contains("' '"));
        assert!(e("a/b").contains("'/'"));
        assert!(e("аlice").contains("'а'"), "cyrillic a");
        assert_eq!(e("-alice"), "user name must start with a letter or digit");
        assert_eq!(e(&"a".repeat(65)), "user name is longer than 64 characters");
        assert!(DeviceName::new("lap*top").is_err());
    }

    #[test]
    fn sanitizes_host_names() {
        assert_eq!(DeviceName::sanitized("my laptop").as_str(), "my-laptop");
        assert_eq!(DeviceName::sanitized("_x").as_str(), "d_x");
        assert!(DeviceName::new(DeviceName::sanitized("ünïcödé/..").as_str()).is_ok());
    }
}
