//! Prompt templates per model family, chosen by the backend and the
//! model's name, each overridable by the job (`caption.system_prompt`,
//! `caption.prompt`). They follow what each model was trained to answer:
//! JoyCaption's own system and user prompts (its README, fpgaminer/joycaption#28),
//! Florence-2's task token (`<DETAILED_CAPTION>`: the model takes no free
//! text), and a plain instruction for Qwen2-VL, Gemini and the rest. Every
//! default asks for one paragraph without a preamble; [`super::tidy`]
//! takes off what a model adds anyway.

/// A family of caption models that wants its own prompts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    JoyCaption,
    Qwen,
    Florence,
    Gemini,
    Other,
}

impl Family {
    /// The family of `model` served by `backend`.
    pub fn of(backend: &str, model: &str) -> Family {
        let model = model.to_ascii_lowercase();
        if model.contains("joycaption") {
            Family::JoyCaption
        } else if model.contains("florence") {
            Family::Florence
        } else if model.contains("qwen") {
            Family::Qwen
        } else if backend == "gemini" || model.contains("gemini") {
            Family::Gemini
        } else {
            Family::Other
        }
    }
}

/// The system prompt and instruction for one kind of file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompts {
    pub system: String,
    /// For an image.
    pub image: String,
    /// For a video (sent whole, or as frames in order).
    pub video: String,
}

impl Prompts {
    /// The family's defaults, with the job's own prompts in their place
    /// when set (the job's prompt then serves images and videos alike).
    pub fn for_job(family: Family, system: &str, prompt: &str) -> Prompts {
        let mut prompts = Prompts::defaults(family);
        if !system.trim().is_empty() {
            prompts.system = system.trim().to_owned();
        }
        if !prompt.trim().is_empty() {
            prompts.image = prompt.trim().to_owned();
            prompts.video = prompts.image.clone();
        }
        prompts
    }

    pub fn defaults(family: Family) -> Prompts {
        const PLAIN_IMAGE: &str = "Write one detailed caption for this image, for training an \
             image model: subject, clothing, pose, setting, style, lighting and framing. Plain \
             text in one paragraph, without a preamble such as \"The image shows\".";
        const PLAIN_VIDEO: &str = "Write one detailed caption for this video clip, for training \
             a video model: subject, action and motion, setting, style, lighting and camera \
             movement. Plain text in one paragraph, without a preamble.";
        let (system, image, video) = match family {
            Family::JoyCaption => (
                "You are a helpful image captioner.",
                "Write a descriptive caption for this image in a formal tone.",
                "These are frames of one video clip, in order. Write a descriptive caption for \
                 the clip in a formal tone, including the motion.",
            ),
            Family::Florence => ("", "<DETAILED_CAPTION>", "<DETAILED_CAPTION>"),
            Family::Qwen => ("You are a helpful assistant.", PLAIN_IMAGE, PLAIN_VIDEO),
            Family::Gemini => (
                "You write captions for training image and video generation models.",
                PLAIN_IMAGE,
                PLAIN_VIDEO,
            ),
            Family::Other => (
                "You are a helpful image captioner.",
                PLAIN_IMAGE,
                PLAIN_VIDEO,
            ),
        };
        Prompts {
            system: system.to_owned(),
            image: image.to_owned(),
            video: video.to_owned(),
        }
    }

    /// The instruction for `media`.
    pub fn for_media(&self, media: &super::Media) -> &str {
        match media {
            super::Media::Image => &self.image,
            super::Media::Video(_) => &self.video,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_by_model_name_and_job_overrides() {
        assert_eq!(
            Family::of("openai", "fancyfeast/llama-joycaption-beta-one-hf-llava"),
            Family::JoyCaption
        );
        assert_eq!(
            Family::of("openai", "Qwen/Qwen2-VL-7B-Instruct"),
            Family::Qwen
        );
        assert_eq!(
            Family::of("command", "microsoft/Florence-2-large"),
            Family::Florence
        );
        assert_eq!(Family::of("gemini", "gemini-2.5-flash"), Family::Gemini);
        assert_eq!(Family::of("openai", "gpt-4o-mini"), Family::Other);
        let p = Prompts::for_job(Family::Florence, "", "");
        assert_eq!(p.image, "<DETAILED_CAPTION>");
        let p = Prompts::for_job(Family::JoyCaption, " be brief ", "Caption it.");
        assert_eq!(
            (p.system.as_str(), p.image.as_str(), p.video.as_str()),
            ("be brief", "Caption it.", "Caption it.")
        );
    }
}
