//! Checks a `train.jsonl` against the row formats TRL takes for a method
//! (TRL `docs/source/dataset_formats.md`), before a GPU is held.
//!
//! - SFT: `{"messages": [{"role", "content"}, …]}` with at least one assistant
//!   turn, `{"prompt", "completion"}` (strings, or message lists), or `{"text"}`.
//! - DPO and ORPO: `{"prompt", "chosen", "rejected"}`, all strings or all
//!   message lists.
//!
//! Every row must use the same format: the JSON loader builds one table, and
//! TRL picks the format from its columns.

use super::Method;
use serde_json::{Map, Value};
use std::io::BufRead;
use std::path::Path;

/// Problems listed before the rest are only counted.
const MAX_PROBLEMS: usize = 20;
const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

/// The row format of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonlFormat {
    Text,
    PromptCompletion,
    ConversationalPromptCompletion,
    Messages,
    Preference,
    ConversationalPreference,
}

impl JsonlFormat {
    pub fn name(self) -> &'static str {
        match self {
            JsonlFormat::Text => "text",
            JsonlFormat::PromptCompletion => "prompt/completion",
            JsonlFormat::ConversationalPromptCompletion => "conversational prompt/completion",
            JsonlFormat::Messages => "messages",
            JsonlFormat::Preference => "preference (prompt/chosen/rejected)",
            JsonlFormat::ConversationalPreference => {
                "conversational preference (prompt/chosen/rejected)"
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonlStats {
    pub rows: usize,
    pub format: JsonlFormat,
}

/// Checks every line of `path` for `method`. Blocking: call it off the async
/// runtime. Problems name the line; past twenty, the rest are counted.
pub fn check_jsonl(path: &Path, method: Method) -> Result<JsonlStats, Vec<String>> {
    let file = std::fs::File::open(path)
        .map_err(|e| vec![format!("{}: cannot open: {e}", path.display())])?;
    let mut reader = std::io::BufReader::new(file);
    let mut problems = Vec::new();
    let mut more = 0usize;
    let mut report = |problem: String| {
        if problems.len() < MAX_PROBLEMS {
            problems.push(problem);
        } else {
            more += 1;
        }
    };
    let mut rows = 0usize;
    let mut first: Option<(JsonlFormat, usize)> = None;
    let mut buf = Vec::new();
    for number in 1.. {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                report(format!(
                    "{}: read failed at line {number}: {e}",
                    path.display()
                ));
                break;
            }
        }
        let Ok(text) = std::str::from_utf8(&buf) else {
            report(format!("line {number}: not valid UTF-8"));
            continue;
        };
        if text.trim().is_empty() {
            continue;
        }
        rows += 1;
        let row = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(row)) => row,
            Ok(other) => {
                report(format!(
                    "line {number}: expected a JSON object, found {}",
                    kind(&other)
                ));
                continue;
            }
            Err(e) => {
                report(format!("line {number}: not valid JSON: {e}"));
                continue;
            }
        };
        let format = match method {
            Method::Sft => sft_row(&row),
            Method::Dpo | Method::Orpo => preference_row(&row, method),
        };
        match (format, first) {
            (Err(problem), _) => report(format!("line {number}: {problem}")),
            (Ok(format), None) => first = Some((format, number)),
            (Ok(format), Some((expected, line))) if format != expected => report(format!(
                "line {number}: a {} row, but line {line} is a {} row; every row must use the same format",
                format.name(),
                expected.name()
            )),
            (Ok(_), Some(_)) => {}
        }
    }
    if rows == 0 && problems.is_empty() {
        problems.push(format!("{}: no rows", path.display()));
    }
    if more > 0 {
        problems.push(format!("… and {more} more problems"));
    }
    match (problems.is_empty(), first) {
        (true, Some((format, _))) => Ok(JsonlStats { rows, format }),
        _ => Err(problems),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn keys(row: &Map<String, Value>) -> String {
    let keys: Vec<&str> = row.keys().map(String::as_str).collect();
    if keys.is_empty() {
        "none".into()
    } else {
        keys.join(", ")
    }
}

fn sft_row(row: &Map<String, Value>) -> Result<JsonlFormat, String> {
    if let Some(messages) = row.get("messages") {
        messages_list(messages, "messages", true)?;
        return Ok(JsonlFormat::Messages);
    }
    match (row.get("prompt"), row.get("completion")) {
        (Some(Value::String(_)), Some(Value::String(completion))) => {
            if completion.trim().is_empty() {
                return Err("completion is empty".into());
            }
            return Ok(JsonlFormat::PromptCompletion);
        }
        (Some(prompt @ Value::Array(_)), Some(completion @ Value::Array(_))) => {
            messages_list(prompt, "prompt", false)?;
            messages_list(completion, "completion", true)?;
            return Ok(JsonlFormat::ConversationalPromptCompletion);
        }
        (Some(_), Some(_)) => {
            return Err(
                "prompt and completion must both be strings or both be message lists".into(),
            );
        }
        _ => {}
    }
    match row.get("text") {
        Some(Value::String(text)) if text.trim().is_empty() => Err("text is empty".into()),
        Some(Value::String(_)) => Ok(JsonlFormat::Text),
        Some(other) => Err(format!("text must be a string, found {}", kind(other))),
        None => Err(format!(
            "an SFT row needs `messages`, `prompt` and `completion`, or `text`; found keys: {}",
            keys(row)
        )),
    }
}

fn preference_row(row: &Map<String, Value>, method: Method) -> Result<JsonlFormat, String> {
    let fields = ["prompt", "chosen", "rejected"];
    let missing: Vec<&str> = fields
        .into_iter()
        .filter(|f| !row.contains_key(*f))
        .collect();
    if !missing.is_empty() {
        let row_kind = if method == Method::Orpo {
            "an ORPO"
        } else {
            "a DPO"
        };
        return Err(format!(
            "{row_kind} row needs prompt, chosen and rejected; missing: {}",
            missing.join(", ")
        ));
    }
    let values = fields.map(|f| &row[f]);
    if values.iter().all(|v| v.is_string()) {
        for (field, value) in fields.iter().zip(values).skip(1) {
            if value.as_str().is_some_and(|s| s.trim().is_empty()) {
                return Err(format!("{field} is empty"));
            }
        }
        return Ok(JsonlFormat::Preference);
    }
    if values.iter().all(|v| v.is_array()) {
        messages_list(values[0], "prompt", false)?;
        messages_list(values[1], "chosen", true)?;
        messages_list(values[2], "rejected", true)?;
        return Ok(JsonlFormat::ConversationalPreference);
    }
    Err("prompt, chosen and rejected must all be strings or all be message lists".into())
}

/// A non-empty list of `{role, content}` with known roles.
fn messages_list(value: &Value, field: &str, needs_assistant: bool) -> Result<(), String> {
    let Value::Array(messages) = value else {
        return Err(format!(
            "{field} must be a list of messages, found {}",
            kind(value)
        ));
    };
    if messages.is_empty() {
        return Err(format!("{field} is an empty list"));
    }
    for (i, message) in messages.iter().enumerate() {
        let Value::Object(message) = message else {
            return Err(format!(
                "{field}[{i}] must be an object with role and content"
            ));
        };
        match message.get("role") {
            Some(Value::String(role)) if ROLES.contains(&role.as_str()) => {}
            Some(Value::String(role)) => {
                return Err(format!(
                    "{field}[{i}].role {role:?} is not one of {}",
                    ROLES.join(", ")
                ));
            }
            _ => return Err(format!("{field}[{i}] has no role")),
        }
        match message.get("content") {
            Some(Value::String(_)) => {}
            // Content as typed parts: [{"type": "text", "text": …}].
            Some(Value::Array(parts)) if parts.iter().all(|p| p.get("type").is_some()) => {}
            Some(other) => {
                return Err(format!(
                    "{field}[{i}].content must be a string, found {}",
                    kind(other)
                ));
            }
            None => return Err(format!("{field}[{i}] has no content")),
        }
    }
    if needs_assistant && !messages.iter().any(|m| m["role"] == "assistant") {
        return Err(format!("{field} has no assistant turn"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn check(method: Method, lines: &[&str]) -> Result<JsonlStats, Vec<String>> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        for line in lines {
            writeln!(file, "{line}").unwrap();
        }
        check_jsonl(file.path(), method)
    }

    const CHAT: &str = r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#;

    #[test]
    fn each_format_is_accepted() {
        let cases: &[(Method, &str, JsonlFormat)] = &[
            (Method::Sft, CHAT, JsonlFormat::Messages),
            (
                Method::Sft,
                r#"{"prompt":"2+2=","completion":"4"}"#,
                JsonlFormat::PromptCompletion,
            ),
            (
                Method::Sft,
                r#"{"prompt":[{"role":"user","content":"2+2?"}],"completion":[{"role":"assistant","content":"4"}]}"#,
                JsonlFormat::ConversationalPromptCompletion,
            ),
            (
                Method::Sft,
                r#"{"text":"The sky is blue."}"#,
                JsonlFormat::Text,
            ),
            (
                Method::Dpo,
                r#"{"prompt":"The sky is","chosen":" blue.","rejected":" green."}"#,
                JsonlFormat::Preference,
            ),
            (
                Method::Orpo,
                r#"{"prompt":[{"role":"user","content":"Sky colour?"}],"chosen":[{"role":"assistant","content":"Blue."}],"rejected":[{"role":"assistant","content":"Green."}]}"#,
                JsonlFormat::ConversationalPreference,
            ),
        ];
        for (method, line, format) in cases {
            let stats =
                check(*method, &[line, "", line]).unwrap_or_else(|p| panic!("{line}: {p:?}"));
            assert_eq!(
                stats,
                JsonlStats {
                    rows: 2,
                    format: *format
                },
                "{line}"
            );
        }
    }

    #[test]
    fn bad_rows_are_named_by_line() {
        let lines = [
            CHAT,                                                                  // 1
            "{not json",                                                           // 2
            "[1, 2]",                                                              // 3
            r#"{"messages":[{"role":"bot","content":"hi"}]}"#,                     // 4
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,                    // 5
            r#"{"messages":[{"role":"user"}]}"#,                                   // 6
            r#"{"messages":"hi"}"#,                                                // 7
            r#"{"text":"fine but different"}"#,                                    // 8
            r#"{"prompt":"q","completion":[{"role":"assistant","content":"a"}]}"#, // 9
            r#"{"input":"x","output":"y"}"#,                                       // 10
            r#"{"text":"  "}"#,                                                    // 11
        ];
        let problems = check(Method::Sft, &lines).unwrap_err();
        let expect = [
            "line 2: not valid JSON",
            "line 3: expected a JSON object, found an array",
            "line 4: messages[0].role \"bot\" is not one of system, user, assistant, tool",
            "line 5: messages has no assistant turn",
            "line 6: messages[0] has no content",
            "line 7: messages must be a list of messages, found a string",
            "line 8: a text row, but line 1 is a messages row",
            "line 9: prompt and completion must both be strings or both be message lists",
            "line 10: an SFT row needs `messages`, `prompt` and `completion`, or `text`; found keys: input, output",
            "line 11: text is empty",
        ];
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");
        for (problem, expected) in problems.iter().zip(expect) {
            assert!(
                problem.starts_with(expected),
                "{problem:?} should start with {expected:?}"
            );
        }
    }

    #[test]
    fn preference_rows_need_all_three_fields_of_one_kind() {
        let lines = [
            r#"{"prompt":"p","chosen":"a","rejected":"b"}"#,
            r#"{"prompt":"p","chosen":"a"}"#,
            r#"{"chosen":"a","rejected":"b"}"#,
            r#"{"prompt":"p","chosen":[{"role":"assistant","content":"a"}],"rejected":"b"}"#,
            r#"{"prompt":"p","chosen":"","rejected":"b"}"#,
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}"#,
        ];
        let problems = check(Method::Dpo, &lines).unwrap_err();
        let expect = [
            "line 2: a DPO row needs prompt, chosen and rejected; missing: rejected",
            "line 3: a DPO row needs prompt, chosen and rejected; missing: prompt",
            "line 4: prompt, chosen and rejected must all be strings or all be message lists",
            "line 5: chosen is empty",
            "line 6: a DPO row needs prompt, chosen and rejected; missing: prompt, chosen, rejected",
        ];
        assert_eq!(problems, expect);
        let orpo = check(Method::Orpo, &lines[1..2]).unwrap_err();
        assert_eq!(
            orpo,
            ["line 1: an ORPO row needs prompt, chosen and rejected; missing: rejected"]
        );
    }

    #[test]
    fn long_lists_are_capped_and_empty_files_refused() {
        let bad = vec![r#"{"x":1}"#; 45];
        let problems = check(Method::Sft, &bad).unwrap_err();
        assert_eq!(problems.len(), MAX_PROBLEMS + 1);
        assert_eq!(problems[19].split(':').next(), Some("line 20"));
        assert_eq!(problems[20], "… and 25 more problems");
        let problems = check(Method::Sft, &["", "  "]).unwrap_err();
        assert!(problems[0].ends_with(": no rows"), "{problems:?}");
        let missing = check_jsonl(Path::new("/nonexistent/train.jsonl"), Method::Sft).unwrap_err();
        assert!(missing[0].contains("cannot open"), "{missing:?}");
    }
}
