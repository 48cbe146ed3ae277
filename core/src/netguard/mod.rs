//! The address guard for every URL a user gives us (dataset URLs, webhook
//! URLs): reqwest hooks that refuse private, loopback, link-local, CGNAT and
//! other non-public addresses *after* DNS resolution, on literal-IP URLs and
//! on every redirect hop. The captioner's download client and the
//! coordinator's webhook client build their `reqwest::Client` with
//! [`GuardedResolver`] and [`Guard::redirect_policy`] (or no redirects).

mod address;
mod guard;

pub use address::is_forbidden_ip;
pub use guard::{Guard, GuardedResolver, Refusal};

/// The guard's own refusal inside a reqwest error's source chain, if the
/// request failed because of it.
pub fn refusal_of(err: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(refusal) = e.downcast_ref::<Refusal>() {
            return Some(refusal.clone());
        }
        source = e.source();
    }
    None
}
