//! What a vision model's answer goes through before it is a caption: one
//! line, surrounding quotes and the boilerplate openings models add ("The
//! image shows …", "This is a photo of …") taken off, what is left kept as
//! the model wrote it (LoRA captions often start lowercase), and a length
//! bound — cut at the last word that fits, and an answer with too
//! little left is not a caption ([`CaptionError::InvalidOutput`]), so the
//! shared retries or the job's `on_error` decide, never a one-word
//! caption trained on silently. The trigger word comes after this
//! ([`super::apply_trigger`]).

use super::{CaptionError, normalize_caption};

/// Openings taken off an answer (compared without case); the longest that
/// matches goes, then any comma, colon or dash after it.
pub const BOILERPLATE: &[&str] = &[
    "the image shows",
    "the image depicts",
    "the image features",
    "the image is",
    "this image shows",
    "this image depicts",
    "this image features",
    "this image is",
    "the photo shows",
    "the photograph shows",
    "this photo shows",
    "this is a photo of",
    "this is an image of",
    "this is a picture of",
    "the picture shows",
    "the video shows",
    "the video depicts",
    "this video shows",
    "this video depicts",
    "the clip shows",
    "this clip shows",
    "the frames show",
    "these frames show",
    "in this video",
    "in the video",
    "in this image",
    "in the image",
    "in this photo",
    "here is a caption",
    "caption",
];

/// The bounds an answer is held to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tidy {
    /// Openings to take off (lowercase), e.g. [`BOILERPLATE`].
    pub strip: Vec<String>,
    /// Characters at most (0: no bound); cut at a word boundary.
    pub max_chars: usize,
    /// Characters at least once tidied; fewer is not a caption.
    pub min_chars: usize,
}

impl Default for Tidy {
    fn default() -> Self {
        Self {
            strip: BOILERPLATE.iter().map(|s| s.to_string()).collect(),
            max_chars: 1_000,
            min_chars: 3,
        }
    }
}

impl Tidy {
    /// The caption in `answer`.
    pub fn apply(&self, answer: &str) -> Result<String, CaptionError> {
        let mut text = normalize_caption(answer.trim_matches(|c| c == '"' || c == '\''));
        text = text
            .trim_matches(|c| c == '"' || c == '\'')
            .trim()
            .to_string();
        if let Some(rest) = self.without_opening(&text) {
            text = rest;
        }
        if self.max_chars > 0 && text.chars().count() > self.max_chars {
            text = cut(&text, self.max_chars);
        }
        if text.chars().count() < self.min_chars.max(1) {
            return Err(CaptionError::InvalidOutput {
                message: format!("too short once tidied: {:?}", short(answer)),
            });
        }
        Ok(text)
    }

    /// `text` without its longest boilerplate opening, if one matches at a
    /// word boundary.
    fn without_opening(&self, text: &str) -> Option<String> {
        let lower = text.to_lowercase();
        let opening = self
            .strip
            .iter()
            .filter(|o| {
                lower.starts_with(o.as_str())
                    && lower[o.len()..]
                        .chars()
                        .next()
                        .is_none_or(|c| !c.is_alphanumeric())
            })
            .max_by_key(|o| o.len())?;
        // Lowercasing may change byte lengths outside ASCII: cut by chars.
        let skip = opening.chars().count();
        let rest: String = text.chars().skip(skip).collect();
        let rest = rest.trim_start_matches(|c: char| c.is_whitespace() || ",:;-–—".contains(c));
        Some(rest.to_string())
    }
}

/// The longest prefix of `text` of at most `max` characters that ends at a
/// word boundary, without trailing punctuation other than a full stop.
fn cut(text: &str, max: usize) -> String {
    let prefix: String = text.chars().take(max).collect();
    let at_boundary = text.chars().nth(max).is_none_or(char::is_whitespace);
    let kept = if at_boundary {
        prefix.as_str()
    } else {
        prefix
            .rsplit_once(' ')
            .map_or(prefix.as_str(), |(head, _)| head)
    };
    kept.trim_end_matches(|c: char| c == ',' || c == ';' || c == ':' || c.is_whitespace())
        .to_string()
}

/// An answer's start, for an error message.
fn short(answer: &str) -> String {
    answer.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_become_one_line_captions_without_boilerplate() {
        let tidy = Tidy::default();
        let cases = [
            (
                "The image shows a red car parked on a street.",
                "a red car parked on a street.",
            ),
            ("This is a photo of a woman, smiling", "a woman, smiling"),
            (
                "In this image, a dog\nruns on\n\nthe beach",
                "a dog runs on the beach",
            ),
            ("\"A watercolor of a fox\"", "A watercolor of a fox"),
            ("THE IMAGE DEPICTS: a castle at dusk", "a castle at dusk"),
            ("Caption: tyzx in a garden", "tyzx in a garden"),
            // An opening only at a word boundary.
            (
                "The imagery is bold, a poster",
                "The imagery is bold, a poster",
            ),
            (
                "Captions everywhere on a wall",
                "Captions everywhere on a wall",
            ),
            ("a cat, [trigger] style", "a cat, [trigger] style"),
        ];
        for (answer, want) in cases {
            assert_eq!(tidy.apply(answer).expect(answer), want, "{answer:?}");
        }
    }

    #[test]
    fn long_answers_are_cut_at_a_word_and_empty_ones_refused() {
        let tidy = Tidy {
            max_chars: 20,
            ..Tidy::default()
        };
        assert_eq!(
            tidy.apply("a red car parked on a long street").unwrap(),
            "a red car parked on"
        );
        // 21 characters: cut at the last word, without the comma before it.
        assert_eq!(
            tidy.apply("a red car, parked, on").unwrap(),
            "a red car, parked"
        );
        assert_eq!(
            tidy.apply("abcdefghijklmnopqrstuvwxyz").unwrap(),
            "abcdefghijklmnopqrst"
        );
        for empty in ["", "  \n ", "The image shows", "The image shows: .", "\"\""] {
            let error = tidy.apply(empty).unwrap_err();
            assert!(
                matches!(error, CaptionError::InvalidOutput { .. }),
                "{empty:?}: {error:?}"
            );
        }
    }

    #[test]
    fn non_ascii_openings_and_text_are_cut_by_characters() {
        let tidy = Tidy {
            max_chars: 8,
            ..Tidy::default()
        };
        assert_eq!(tidy.apply("The image shows ÄÖÜ äöü éè").unwrap(), "ÄÖÜ äöü");
    }
}
