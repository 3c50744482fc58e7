"""The built-in vocabulary the CLIP style tagger ranks: medium, art style, lighting and colour terms.

Categories are listed in the order their tags follow the BLIP sentence in a caption
(subject, action, clothing/features, scene -> medium, art style, lighting, colour).
"""

from __future__ import annotations

STYLE_VOCABULARY: dict[str, tuple[str, ...]] = {
    "medium": (
        "photograph", "digital painting", "oil painting", "watercolor painting", "acrylic painting",
        "pencil sketch", "charcoal drawing", "ink drawing", "pastel drawing", "3d render", "pixel art",
        "vector illustration", "anime illustration", "comic book art", "concept art", "collage", "linocut print",
        "woodblock print", "gouache painting", "screen print",
    ),
    "style": (
        "realistic", "photorealistic", "impressionist", "expressionist", "art nouveau", "art deco", "surrealist",
        "minimalist", "abstract", "pop art", "cyberpunk", "steampunk", "fantasy art", "baroque", "renaissance",
        "ukiyo-e", "studio ghibli style", "flat design", "low poly", "vaporwave", "gothic", "cartoon",
        "cinematic", "vintage", "film noir",
    ),
    "lighting": (
        "soft lighting", "dramatic lighting", "natural lighting", "studio lighting", "backlit", "rim lighting",
        "golden hour", "blue hour", "neon lighting", "candlelight", "overcast light", "harsh sunlight",
        "volumetric lighting", "low key lighting", "high key lighting", "moonlight",
    ),
    "colour": (
        "vibrant colors", "muted colors", "pastel colors", "monochrome", "black and white", "sepia",
        "warm tones", "cool tones", "earthy tones", "neon colors", "high contrast", "low contrast",
        "desaturated", "complementary colors", "dark palette", "bright palette",
    ),
}

CATEGORY_ORDER: tuple[str, ...] = tuple(STYLE_VOCABULARY)
