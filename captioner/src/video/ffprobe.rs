//! Reading `ffprobe -print_format json -show_format -show_streams`.
//!
//! Pure: bytes of ffprobe's answer in, a clip's facts (or why it is not a
//! clip) out, so every odd answer is a unit test. The first video stream
//! that is not cover art (`disposition.attached_pic`) is the clip; the
//! duration is the stream's, else the container's; the frame rate
//! `avg_frame_rate`, else `r_frame_rate`; the frame count `nb_frames` when
//! the container records it (mp4, mov), else duration × rate (webm and
//! matroska do not count frames).

use serde::Deserialize;

/// What ffprobe says about a clip.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeFacts {
    pub width: u32,
    pub height: u32,
    pub codec: String,
    pub duration_secs: f64,
    /// Frames per second.
    pub fps: f64,
    pub frames: u64,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    streams: Vec<Stream>,
    #[serde(default)]
    format: Option<Format>,
}

#[derive(Deserialize)]
struct Stream {
    #[serde(default)]
    codec_type: String,
    #[serde(default)]
    codec_name: String,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    height: Option<u32>,
    #[serde(default)]
    avg_frame_rate: Option<String>,
    #[serde(default)]
    r_frame_rate: Option<String>,
    #[serde(default)]
    duration: Option<String>,
    #[serde(default)]
    nb_frames: Option<String>,
    #[serde(default)]
    disposition: Option<Disposition>,
}

#[derive(Deserialize)]
struct Disposition {
    #[serde(default)]
    attached_pic: u8,
}

#[derive(Deserialize)]
struct Format {
    #[serde(default)]
    duration: Option<String>,
}

/// A rate such as `30000/1001` or `16/1`; `None` for `0/0` and junk.
fn rate(text: &str) -> Option<f64> {
    let (num, den) = text.split_once('/').unwrap_or((text, "1"));
    let (num, den): (f64, f64) = (num.trim().parse().ok()?, den.trim().parse().ok()?);
    let rate = num / den;
    (rate.is_finite() && rate > 0.0).then_some(rate)
}

fn seconds(text: Option<&String>) -> Option<f64> {
    let secs: f64 = text?.trim().parse().ok()?;
    (secs.is_finite() && secs > 0.0).then_some(secs)
}

/// The clip's facts, or a sentence saying why `json` describes no usable
/// clip (no video stream, no size, zero frames or duration).
pub fn parse(json: &[u8]) -> Result<ProbeFacts, String> {
    let answer: Answer = serde_json::from_slice(json)
        .map_err(|e| format!("ffprobe answered unreadable json: {e}"))?;
    let stream = answer
        .streams
        .iter()
        .find(|s| {
            s.codec_type == "video" && s.disposition.as_ref().is_none_or(|d| d.attached_pic == 0)
        })
        .ok_or_else(|| "the file holds no video stream".to_owned())?;
    let (width, height) = match (stream.width, stream.height) {
        (Some(w), Some(h)) if w > 0 && h > 0 => (w, h),
        _ => return Err("the video stream has no picture size".to_owned()),
    };
    let fps = stream
        .avg_frame_rate
        .as_deref()
        .and_then(rate)
        .or_else(|| stream.r_frame_rate.as_deref().and_then(rate));
    let duration = seconds(stream.duration.as_ref())
        .or_else(|| seconds(answer.format.as_ref().and_then(|f| f.duration.as_ref())));
    let counted = stream
        .nb_frames
        .as_deref()
        .and_then(|n| n.trim().parse::<u64>().ok())
        .filter(|&n| n > 0);
    let frames = match (counted, duration, fps) {
        (Some(n), _, _) => n,
        (None, Some(d), Some(r)) => (d * r).round() as u64,
        _ => 0,
    };
    let (Some(duration_secs), true) = (duration, frames > 0) else {
        return Err("the clip has no frames or no duration".to_owned());
    };
    let fps = fps.unwrap_or(frames as f64 / duration_secs);
    Ok(ProbeFacts {
        width,
        height,
        codec: stream.codec_name.clone(),
        duration_secs,
        fps,
        frames,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mp4_counts_its_frames() {
        let json =
            br#"{"streams":[{"codec_type":"video","codec_name":"h264","width":64,"height":48,
            "r_frame_rate":"16/1","avg_frame_rate":"16/1","duration":"1.000000","nb_frames":"16",
            "disposition":{"attached_pic":0}}],"format":{"duration":"1.000000"}}"#;
        let facts = parse(json).unwrap();
        assert_eq!(
            facts,
            ProbeFacts {
                width: 64,
                height: 48,
                codec: "h264".into(),
                duration_secs: 1.0,
                fps: 16.0,
                frames: 16,
            }
        );
    }

    #[test]
    fn a_webm_without_a_frame_count_gets_duration_times_rate() {
        let json =
            br#"{"streams":[{"codec_type":"video","codec_name":"vp9","width":640,"height":360,
            "r_frame_rate":"30000/1001","avg_frame_rate":"30000/1001"}],
            "format":{"duration":"2.002000"}}"#;
        let facts = parse(json).unwrap();
        assert_eq!((facts.frames, facts.codec.as_str()), (60, "vp9"));
        assert!((facts.fps - 29.97).abs() < 0.01);
    }

    #[test]
    fn cover_art_and_audio_are_not_the_clip() {
        let json = br#"{"streams":[{"codec_type":"audio","codec_name":"aac"},
            {"codec_type":"video","codec_name":"mjpeg","width":300,"height":300,"avg_frame_rate":"0/0",
             "disposition":{"attached_pic":1}}],"format":{"duration":"3.0"}}"#;
        assert_eq!(parse(json).unwrap_err(), "the file holds no video stream");
    }

    #[test]
    fn empty_and_broken_answers_say_why() {
        assert_eq!(parse(b"{}").unwrap_err(), "the file holds no video stream");
        assert!(parse(b"not json").unwrap_err().contains("unreadable json"));
        let sizeless = br#"{"streams":[{"codec_type":"video","codec_name":"h264"}]}"#;
        assert_eq!(
            parse(sizeless).unwrap_err(),
            "the video stream has no picture size"
        );
        let empty = br#"{"streams":[{"codec_type":"video","codec_name":"h264","width":8,"height":8,
            "avg_frame_rate":"0/0","r_frame_rate":"0/0","nb_frames":"0"}],"format":{"duration":"N/A"}}"#;
        assert_eq!(
            parse(empty).unwrap_err(),
            "the clip has no frames or no duration"
        );
    }

    #[test]
    fn rates_parse_like_ffprobe_writes_them() {
        assert_eq!(rate("16/1"), Some(16.0));
        assert_eq!(rate("25"), Some(25.0));
        assert_eq!(rate("0/0"), None);
        assert_eq!(rate("x/1"), None);
    }
}
