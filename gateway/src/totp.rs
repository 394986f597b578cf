//! TOTP secrets and the code guard: pure decisions on an injected clock.
//!
//! Codes are RFC 6238 with what authenticator apps expect: SHA-1, 6 digits, 30 s steps. The guard
//! checks the steps itself (current, one before, one after: one step of clock skew either way),
//! compares in constant time, and refuses a step at or before the last accepted one, so a code
//! cannot be replayed within its validity window or after a restart (the last step is stored).
use ring::rand::{SecureRandom, SystemRandom};
use secrecy::{ExposeSecret, SecretBox};
use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, TOTP};

pub const DIGITS: usize = 6;
pub const STEP_SECS: u64 = 30;
pub const SECRET_LEN: usize = 20;
/// Steps accepted on each side of the current one.
pub const SKEW_STEPS: i64 = 1;
pub const ISSUER: &str = "ZeroSpice";

/// A TOTP seed. Never `Debug`-printed, zeroed on drop.
pub struct TotpSecret(SecretBox<[u8]>);

impl std::fmt::Debug for TotpSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TotpSecret([redacted])")
    }
}

impl TotpSecret {
    pub fn generate() -> Result<Self, ring::error::Unspecified> {
        let mut b = vec![0u8; SECRET_LEN];
        SystemRandom::new().fill(&mut b)?;
        Ok(Self::from_bytes(b))
    }
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(SecretBox::new(bytes.into_boxed_slice()))
    }
    pub fn expose_bytes(&self) -> &[u8] {
        self.0.expose_secret()
    }

    fn totp(&self, account: &str) -> TOTP {
        TOTP::new_unchecked(
            Algorithm::SHA1,
            DIGITS,
            1,
            STEP_SECS,
            self.expose_bytes().to_vec(),
            Some(ISSUER.to_string()),
            account.to_string(),
        )
    }

    /// The code for a time step.
    pub fn code_at_step(&self, step: i64) -> String {
        self.totp("").generate(step.max(0) as u64 * STEP_SECS)
    }

    /// Base32 (RFC 4648, no padding), as authenticator apps and `oathtool -b` take it.
    pub fn base32(&self) -> String {
        self.totp("").get_secret_base32()
    }

    /// `otpauth://totp/ZeroSpice:alice?secret=...&issuer=ZeroSpice`
    pub fn otpauth_uri(&self, account: &str) -> String {
        self.totp(account).get_url()
    }
}

/// The time step containing `now` (unix seconds).
pub fn step_of(now: i64) -> i64 {
    now.div_euclid(STEP_SECS as i64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeRefusal {
    /// No step in the window matches (or the text is not 6 digits).
    Wrong,
    /// A step matched, but it is not newer than the last accepted step.
    Reused,
}

/// Checks `code` against the steps around `now`. On success returns the matched step, which
/// the caller must store as the user's last accepted step in the same transaction that issues.
pub fn check_code(
    secret: &TotpSecret,
    code: &str,
    now: i64,
    last_step: Option<i64>,
) -> Result<i64, CodeRefusal> {
    let well_formed = code.len() == DIGITS && code.bytes().all(|b| b.is_ascii_digit());
    let current = step_of(now);
    let mut fresh_match: Option<i64> = None;
    let mut stale_match = false;
    // Every step is computed and compared, whatever the input, in constant time.
    for step in (current - SKEW_STEPS)..=(current + SKEW_STEPS) {
        let expected = secret.code_at_step(step);
        let equal: bool = expected.as_bytes().ct_eq(code.as_bytes()).into();
        if equal && well_formed {
            if last_step.is_some_and(|last| step <= last) {
                stale_match = true;
            } else {
                fresh_match = Some(fresh_match.map_or(step, |s: i64| s.max(step)));
            }
        }
    }
    match (fresh_match, stale_match) {
        (Some(step), _) => Ok(step),
        (None, true) => Err(CodeRefusal::Reused),
        (None, false) => Err(CodeRefusal::Wrong),
    }
}

/// Failure counting with a growing lockout.
///
/// The first `free_failures - 1` failures cost nothing; the `free_failures`-th locks for
/// `base_secs`, and each further failure after a lockout doubles it, up to `max_secs`. A success
/// resets the count. Attempts during a lockout are refused without checking the code and are not
/// counted (so an attacker cannot extend a victim's lockout forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    pub free_failures: u32,
    pub base_secs: u64,
    pub max_secs: u64,
}

impl LockoutPolicy {
    /// Per user: 5 failures, then 1 min, 2 min, 4 min, ... up to 1 h.
    pub const USER: LockoutPolicy = LockoutPolicy {
        free_failures: 5,
        base_secs: 60,
        max_secs: 3600,
    };
    /// Per source address: 10 failures (any user names), then the same growth.
    pub const ADDRESS: LockoutPolicy = LockoutPolicy {
        free_failures: 10,
        base_secs: 60,
        max_secs: 3600,
    };

    /// Lock duration after the `count`-th consecutive failure, if any.
    pub fn lockout_after(&self, count: u32) -> Option<u64> {
        if count < self.free_failures {
            return None;
        }
        let doublings = (count - self.free_failures).min(32);
        Some(
            self.base_secs
                .saturating_mul(1u64 << doublings)
                .min(self.max_secs),
        )
    }
}

/// A failure counter as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FailureState {
    pub count: u32,
    /// Unix time until which attempts are refused (0: not locked).
    pub locked_until: i64,
}

impl FailureState {
    /// Seconds left in the lockout at `now`, if locked.
    pub fn locked_for(&self, now: i64) -> Option<u64> {
        (self.locked_until > now).then(|| (self.locked_until - now) as u64)
    }

    /// The state after one more failure at `now`.
    pub fn after_failure(self, policy: &LockoutPolicy, now: i64) -> FailureState {
        let count = self.count.saturating_add(1);
        let locked_until = match policy.lockout_after(count) {
            Some(secs) => now + secs as i64,
            None => self.locked_until,
        };
        FailureState {
            count,
            locked_until,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> TotpSecret {
        // RFC 6238 appendix B test seed (SHA-1).
        TotpSecret::from_bytes(b"12345678901234567890".to_vec())
    }

    #[test]
    fn rfc6238_vectors() {
        // RFC 6238 gives 8-digit codes; the 6-digit code is their last six digits.
        let s = secret();
        for (t, code8) in [
            (59i64, "94287082"),
            (1111111109, "07081804"),
            (1111111111, "14050471"),
            (1234567890, "89005924"),
            (2000000000, "69279037"),
        ] {
            assert_eq!(s.code_at_step(step_of(t)), &code8[2..], "t={t}");
        }
        assert_eq!(s.base32(), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        assert_eq!(
            s.otpauth_uri("alice"),
            "otpauth://totp/ZeroSpice:alice?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=ZeroSpice"
        );
    }

    #[test]
    fn one_step_of_skew_each_way() {
        let s = secret();
        let now = 1_700_000_000;
        let t = step_of(now);
        for d in [-1, 0, 1] {
            assert_eq!(check_code(&s, &s.code_at_step(t + d), now, None), Ok(t + d));
        }
        for d in [-2, 2, 10] {
            assert_eq!(
                check_code(&s, &s.code_at_step(t + d), now, None),
                Err(CodeRefusal::Wrong)
            );
        }
    }

    #[test]
    fn a_code_cannot_be_replayed_within_its_window() {
        let s = secret();
        let now = 1_700_000_000;
        let t = step_of(now);
        let code = s.code_at_step(t);
        let step = check_code(&s, &code, now, None).unwrap();
        // Same code, same instant, and still valid 30 s later (as "previous step"): refused.
        assert_eq!(
            check_code(&s, &code, now, Some(step)),
            Err(CodeRefusal::Reused)
        );
        assert_eq!(
            check_code(&s, &code, now + 30, Some(step)),
            Err(CodeRefusal::Reused)
        );
        // An older code, still inside the skew window, is refused too.
        assert_eq!(
            check_code(&s, &s.code_at_step(t - 1), now, Some(step)),
            Err(CodeRefusal::Reused)
        );
        // The next code is fine.
        assert_eq!(
            check_code(&s, &s.code_at_step(t + 1), now + 30, Some(step)),
            Ok(t + 1)
        );
    }

    #[test]
    fn malformed_codes_are_wrong() {
        let s = secret();
        let now = 1_700_000_000;
        let code = s.code_at_step(step_of(now));
        for bad in [
            "",
            "12345",
            "1234567",
            "abcdef",
            &format!(" {code}"),
            "１２３４５６",
        ] {
            assert_eq!(
                check_code(&s, bad, now, None),
                Err(CodeRefusal::Wrong),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn lockout_grows_and_caps() {
        let p = LockoutPolicy::USER;
        assert_eq!(p.lockout_after(4), None);
        assert_eq!(p.lockout_after(5), Some(60));
        assert_eq!(p.lockout_after(6), Some(120));
        assert_eq!(p.lockout_after(7), Some(240));
        assert_eq!(p.lockout_after(12), Some(3600));
        assert_eq!(p.lockout_after(u32::MAX), Some(3600));

        let mut st = FailureState::default();
        let now = 1000;
        for _ in 0..4 {
            st = st.after_failure(&p, now);
            assert_eq!(st.locked_for(now), None);
        }
        st = st.after_failure(&p, now);
        assert_eq!(st.locked_for(now), Some(60));
        assert_eq!(st.locked_for(now + 59), Some(1));
        assert_eq!(st.locked_for(now + 60), None);
        st = st.after_failure(&p, now + 60);
        assert_eq!(st.locked_for(now + 60), Some(120));
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let s = secret();
        assert_eq!(format!("{s:?}"), "TotpSecret([redacted])");
        let g = TotpSecret::generate().unwrap();
        assert_eq!(g.expose_bytes().len(), SECRET_LEN);
    }
}
