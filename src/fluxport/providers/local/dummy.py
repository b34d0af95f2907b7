"""flux.2-dummy: the real FLUX.2 pipeline at tiny size with random weights, built offline in code.

Every component is the genuine diffusers / transformers class, so the dummy exercises the same code
paths as FLUX.2 [dev] (prompt encoding, references, schedules, LoRA, save/load, prompt upsampling);
only the sizes are shrunk. Its output is noise. Importing this module needs the `local` extra.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from diffusers import Flux2Pipeline
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
)

# A Mistral-style chat template: all the pipeline needs from its tokenizer (reference §4.1).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}[/SYSTEM_PROMPT]{% else %}[INST]"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}[IMG]"
    "{% endif %}{% endfor %}[/INST]{% endif %}{% endfor %}"
)

# Enough everyday and image-prompt English that typical prompts are mostly real tokens.
VOCABULARY = """
. , ! ? : ; ' " - ( ) / & % 0 1 2 3 4 5 6 7 8 9
a an the this that these those some any every each no one two three four five six seven ten many few
all both other another more most less much very too so just only also even still again here there
and or but if then than as because while when where why how what which who whose not nor yet
i you he she it we they me him her us them my your his its our their mine yours
is are was were be been being am do does did have has had can could will would shall should may
might must make makes made take takes took give gives show shows shown look looks see seen use used
get gets go goes going come comes run runs walk walks sit sits stand stands hold holds wear wears
wearing holding sitting standing walking running flying floating dancing playing smiling looking
reading writing painting drinking eating sleeping jumping swimming riding driving cooking singing
of in on at by for with without from to into onto over under above below behind beside between
near around through across along against inside outside up down off out about after before during
top bottom left right front back center middle side edge corner background foreground distance
dog dogs cat cats bird birds horse fish lion tiger bear wolf fox rabbit deer cow sheep owl eagle
butterfly dragon robot monster unicorn elephant whale dolphin frog snake duck chicken mouse
man men woman women person people child children boy girl baby family friend king queen knight
wizard warrior astronaut chef doctor artist farmer soldier pirate princess student teacher
face eyes eye hair hand hands head arm arms leg legs body smile skin beard portrait
house home building castle tower bridge road street city town village room kitchen bedroom
window door wall floor roof garden park forest tree trees flower flowers grass leaf leaves plant
mountain mountains hill river lake sea ocean beach island desert field valley cave sky cloud
clouds sun moon star stars rain snow storm fog wind fire water ice rock stone sand earth space
planet galaxy night day morning evening sunset sunrise light shadow shadows reflection
car cars bus train boat ship plane bicycle truck rocket spaceship
table chair bed lamp book books cup mug bottle glass plate bowl box bag hat shirt dress coat
shoes jacket glasses ring necklace sword shield crown clock phone computer camera guitar piano
apple apples banana orange bread cake coffee tea pizza fruit food wine
sign text word words letter letters logo poster label title name menu
red orange yellow green blue purple pink brown black white gray grey gold golden silver
dark bright light pale vivid colorful warm cool soft hard smooth rough shiny glossy matte
big small large tiny huge little long short tall wide narrow thick thin round square flat
old new young ancient modern futuristic vintage retro classic rustic elegant simple
beautiful pretty cute ugly strange magical mysterious happy sad calm quiet busy empty full
wet dry hot cold sunny cloudy rainy snowy foggy misty clear
detailed realistic photorealistic photograph photo picture image painting drawing sketch
illustration render rendering art style artistic cinematic dramatic epic minimalist abstract
surreal fantasy anime cartoon comic watercolor oil pencil ink digital pixel 3d
lighting lit glow glowing neon studio natural golden hour bokeh depth focus sharp blurry
lens shot close closeup view wide angle aerial macro scene landscape cityscape interior exterior
high quality resolution professional award winning masterpiece composition color colors
texture textures pattern details detail atmosphere mood tone contrast saturation
create generate change make replace remove add keep turn put move edit combine blend
same different first second third last next new original reference
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a Mistral-style chat template and a modest English vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    # The libraries' partial annotations trip mypy --strict; treat them as untyped.
    transformers: Any = importlib.import_module("transformers")

    words = list(dict.fromkeys(VOCABULARY.split()))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    # A WordPiece decoder joins words with spaces and glues punctuation back (with cleanup).
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        padding_side="left",  # left padding is what generate() (prompt upsampling) expects
    )
    tok.chat_template = CHAT_TEMPLATE
    ensure_processor_shape(tok)
    return cast("PreTrainedTokenizerFast", tok)


def ensure_processor_shape(tokenizer: Any) -> None:
    """Let a bare tokenizer stand in for a processor: `upsample_prompt` calls `tokenizer.tokenizer`."""
    if not hasattr(tokenizer, "tokenizer"):
        tokenizer.tokenizer = tokenizer


TEXT_LAYERS = 30  # FLUX.2 reads hidden states 10, 20 and 30: keep the pipeline's defaults valid
TEXT_HIDDEN = 16
LATENT_CHANNELS = 4


def flux2_scheduler() -> Any:
    """FLUX.2 [dev]'s scheduler, as its scheduler_config.json: flow matching with dynamic,
    exponential shifting by image size."""
    diffusers: Any = importlib.import_module("diffusers")  # untyped: its annotations trip mypy --strict
    return diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


def build_dummy_pipeline(seed: int = 0) -> Flux2Pipeline:
    """Build flux.2-dummy with deterministic random weights, without touching the global RNG."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    diffusers: Any = importlib.import_module("diffusers")
    transformers: Any = importlib.import_module("transformers")

    tok: Any = build_tokenizer()
    vocab = tok.get_vocab()
    special_ids = [vocab[t] for t in SPECIAL_TOKENS]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = diffusers.Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4 * LATENT_CHANNELS,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=3 * TEXT_HIDDEN,
            timestep_guidance_channels=32,
            axes_dims_rope=(2, 2, 2, 2),
        )
        text_config = {
            "model_type": "mistral",
            "vocab_size": len(vocab),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 32,
            "max_position_embeddings": 4096,
            "num_attention_heads": 4,
            "num_hidden_layers": TEXT_LAYERS,
            "num_key_value_heads": 2,
            "head_dim": 4,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1e9,
            "sliding_window": None,
            "bos_token_id": vocab["<s>"],
            "eos_token_id": vocab["</s>"],
            "pad_token_id": vocab["<pad>"],
        }
        vision_config = {
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 32,
            "image_size": 30,
            "patch_size": 6,
            "num_channels": 3,
        }
        text_encoder = transformers.Mistral3ForConditionalGeneration(
            transformers.Mistral3Config(
                text_config=text_config,
                vision_config=vision_config,
                image_seq_length=4,
                vision_feature_layer=-1,
                image_token_index=vocab["[IMG]"],
            )
        )
        # Random weights would ramble for the pipeline's fixed 512 new tokens; the length penalty
        # makes the end-of-sequence token win after a short caption, and specials never appear.
        text_encoder.generation_config = transformers.GenerationConfig(
            bos_token_id=vocab["<s>"],
            eos_token_id=vocab["</s>"],
            pad_token_id=vocab["<pad>"],
            exponential_decay_length_penalty=(12, 2.0),
            suppress_tokens=[i for i in special_ids if i != vocab["</s>"]],
        )
        # Four blocks give the real 8x VAE factor, so the latent grid is 16 px as in FLUX.2 [dev];
        # two channels keep the full-resolution decoder layers cheap.
        vae = diffusers.AutoencoderKLFlux2(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(2, 2, 2, 2),
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=1,
            sample_size=1024,
            use_quant_conv=False,
            use_post_quant_conv=False,
            # Mid-block attention at H/8 x W/8 would be a 16k x 16k matrix at 1024 px.
            mid_block_add_attention=False,
        )
    scheduler = flux2_scheduler()
    for module in (transformer, text_encoder, vae):
        module.eval()
    pipe = diffusers.Flux2Pipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
    )
    return cast("Flux2Pipeline", pipe)
