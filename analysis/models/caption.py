"""Image captioning: BLIP base by default, any Hugging Face image-to-text model by configuration."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from imgstream.analysis.imaging import to_pil
from imgstream.analysis.models.base import TensorModel, half_precision, seeded
from imgstream.analysis.preprocess import from_hf_processor
from imgstream.schemas.config import ModelsConfig
from imgstream.schemas.events import ModelInfo

RANDOM_NAME = "Salesforce/blip-image-captioning-base"
# BLIP's BERT vocabulary (30522) plus its two added tokens, [DEC] (bos) and [ENC].
VOCAB_SIZE = 30524

CaptionItem = tuple[torch.Tensor, int]  # (uint8 3xHxW image, max_new_tokens)
# Items of one input size, ready to generate: (their indices, pixel_values NxCxHxW, budgets).
CaptionGroup = tuple[list[int], torch.Tensor, list[int]]


def base_config() -> BlipConfig:
    """The architecture of Salesforce/blip-image-captioning-base.

    BlipConfig() is already base-sized except two fields, set here as in that model's
    config.json: the text decoder has 12 heads (the default is 8), and the vision
    initializer range is 0.02 (the default 1e-10 would start random weights at ~zero).
    """
    return BlipConfig(
        text_config={"num_attention_heads": 12},
        vision_config={"initializer_range": 0.02},
    )


def placeholder_tokenizer() -> BertTokenizer:
    """A BERT-shaped tokenizer with a synthetic vocabulary of BLIP's size, built offline.

    Only the special-token ids are BERT's ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102,
    [MASK]=103, [DEC]=30522, [ENC]=30523); every other id decodes as a placeholder word
    `w<id>`. It pairs with random weights only, whose captions are gibberish anyway.
    """
    specials = {
        0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 30522: "[DEC]", 30523: "[ENC]"
    }
    vocab = {specials.get(token_id, f"w{token_id}"): token_id for token_id in range(VOCAB_SIZE)}
    return BertTokenizer(vocab=vocab, bos_token="[DEC]", additional_special_tokens=["[ENC]"])


class _PromptLength(StoppingCriteria):
    """Records how many tokens preceded generation; never stops it.

    Generated sequences start with a model-specific prompt (BLIP's [DEC], a decoder start
    token, a text prompt); its length is the sequence length at the first step minus one.
    """

    def __init__(self) -> None:
        self.length: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.length is None:
            self.length = input_ids.shape[1] - 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class Captioner(TensorModel):
    """An image-to-text model; outputs one caption per image, greedy and deterministic."""

    key = "caption"

    def __init__(self, config: ModelsConfig, device: torch.device, *, half: bool | None = None) -> None:
        """`half` overrides the fp16 rule (CUDA and models.fp16), e.g. to test fp16 on a CPU."""
        if config.weights == "random":
            with seeded(config.seed):
                model = BlipForConditionalGeneration(base_config())
            processor = BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=placeholder_tokenizer())
            name, weights = RANDOM_NAME, "random"
        else:
            # A Hugging Face id (downloaded once into the HF cache) or a local directory;
            # the Auto classes map BLIP, GIT, VisionEncoderDecoder and other captioners.
            model = AutoModelForImageTextToText.from_pretrained(config.caption_model)
            processor = AutoProcessor.from_pretrained(config.caption_model)
            name, weights = config.caption_model, "pretrained"
        self.device = device
        self.dtype = torch.float16 if (half_precision(config, device) if half is None else half) else torch.float32
        self.info = ModelInfo(name=name, weights=weights)
        self._model = model.to(device=device, dtype=self.dtype).eval()
        self._processor = processor
        # Some captioners ship an image processor only; their tokenizer is stored beside it.
        tokenizer = getattr(processor, "tokenizer", None) or AutoTokenizer.from_pretrained(config.caption_model)
        self._tokenizer: PreTrainedTokenizerBase = tokenizer
        # The processor's resize + normalise as tensor ops when that is all it does (None: use it as is).
        self.transform = from_hf_processor(getattr(processor, "image_processor", processor))

    def collate(self, items: list[CaptionItem]) -> list[CaptionGroup]:
        """Images as the model's pixel_values: as tensor ops on the device when the processor only
        resizes and normalises (BLIP: 384x384 bicubic, OpenAI mean/std), else by the processor."""
        budgets = [max_new_tokens for _, max_new_tokens in items]
        if self.transform is not None:
            pixels = self.transform.batch([image for image, _ in items], self.device, self.dtype)
            return [(list(range(len(items))), pixels, budgets)]
        processed = [self._processor(images=to_pil(image), return_tensors="pt")["pixel_values"][0]
                     for image, _ in items]
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, pixel_values in enumerate(processed):
            by_shape[tuple(pixel_values.shape)].append(index)
        return [(indices, torch.stack([processed[i] for i in indices]).to(self.device, dtype=self.dtype),
                 [budgets[i] for i in indices]) for indices in by_shape.values()]

    def forward(self, groups: list[CaptionGroup]) -> list[str]:
        """Caption each group; each caption has at most its own budget of new tokens."""
        captions: list[str] = [""] * sum(len(indices) for indices, _, _ in groups)
        for indices, pixels, budgets in groups:
            for index, caption in zip(indices, self._generate(pixels, budgets)):
                captions[index] = caption
        return captions

    def _generate(self, pixels: torch.Tensor, budgets: list[int]) -> list[str]:
        """One greedy generate call for the longest budget, then each sequence cut to its own."""
        prompt = _PromptLength()
        with torch.inference_mode():
            sequences = self._model.generate(
                pixel_values=pixels,
                max_new_tokens=max(budgets),
                do_sample=False,
                num_beams=1,
                stopping_criteria=StoppingCriteriaList([prompt]),
                return_dict_in_generate=False,
            )
        # Greedy decoding makes a shorter budget's output a prefix of the longer one's.
        start = prompt.length or 0
        new_tokens = sequences[:, start:].cpu()
        texts = [
            self._tokenizer.decode(tokens[:budget], skip_special_tokens=True)
            for tokens, budget in zip(new_tokens, budgets)
        ]
        return [" ".join(text.split()) for text in texts]
