//! Destination chains (`on_error = "next"`): the spec's destinations in
//! order, where each member but the last of a run says `next`, form one
//! chain — tried in order, the first that takes the outputs is the
//! delivery, each failure before it noted on the job's events; the last
//! member's failure fails the job. A destination that does not say `next`
//! (and does not follow one that does) is a chain of one: it behaves as it
//! always has. The coordinator refuses a `next` on the last destination
//! ([`check_on_error`]); [`chains`] simply ends its chain there.
//!
//! [`chains`] is the plan, pure: the uploader carries it out, preflight
//! reports a chain as a problem only when none of its members can be
//! written.

use trainyard_proto::v1::Destination;

/// What `Destination.on_error` says.
pub const NEXT: &str = "next";
pub const FAIL: &str = "fail";

/// The spec's destinations grouped into chains, as indices in spec order.
pub fn chains(destinations: &[Destination]) -> Vec<Vec<usize>> {
    let mut chains = Vec::new();
    let mut current = Vec::new();
    for (index, destination) in destinations.iter().enumerate() {
        current.push(index);
        if destination.on_error != NEXT {
            chains.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        chains.push(current);
    }
    chains
}

/// Why a spec's `on_error` values are refused: the index of the offending
/// destination and what is wrong.
pub fn check_on_error(destinations: &[Destination]) -> Result<(), (usize, String)> {
    for (index, destination) in destinations.iter().enumerate() {
        match destination.on_error.as_str() {
            "" | FAIL => {}
            NEXT if index + 1 == destinations.len() => {
                return Err((
                    index,
                    "\"next\" needs a destination after it to fall back to".into(),
                ));
            }
            NEXT => {}
            other => {
                return Err((index, format!("{other:?} is not \"fail\" or \"next\"")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(on_error: &[&str]) -> Vec<Destination> {
        on_error
            .iter()
            .enumerate()
            .map(|(i, on_error)| Destination {
                uri: format!("/d{i}"),
                on_error: on_error.to_string(),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn runs_of_next_chain_to_the_first_that_does_not_say_it() {
        let table: &[(&[&str], &[&[usize]])] = &[
            (&[], &[]),
            (&[""], &[&[0]]),
            (&["", "fail"], &[&[0], &[1]]),
            (&["next", ""], &[&[0, 1]]),
            (&["next", "next", "fail", ""], &[&[0, 1, 2], &[3]]),
            (&["", "next", ""], &[&[0], &[1, 2]]),
            // A trailing `next` (refused at submission) ends its chain.
            (&["", "next"], &[&[0], &[1]]),
        ];
        for (on_error, expected) in table {
            let got = chains(&spec(on_error));
            let expected: Vec<Vec<usize>> = expected.iter().map(|c| c.to_vec()).collect();
            assert_eq!(got, expected, "{on_error:?}");
        }
        assert!(check_on_error(&spec(&["next", "fail", ""])).is_ok());
        assert_eq!(check_on_error(&spec(&["", "next"])).unwrap_err().0, 1);
        assert_eq!(check_on_error(&spec(&["skip", ""])).unwrap_err().0, 0);
    }
}
