"""BCP-47 language codes and the language tokens of translation models.

Requests name languages in BCP-47 (``"fr"``, ``"pt-BR"``, ``"zh-Hant"``). Models name them their own way:

* NLLB-200 uses FLORES-200 codes, ISO 639-3 plus ISO 15924 script (``fra_Latn``, ``zho_Hant``), as the
  source token and as the target prefix token.
* M2M100 uses ``__xx__`` tokens with ISO 639-1 codes (``__fr__``).
* A Marian/OPUS-MT model translates one pair and has no language tokens.

Only the primary language subtag and the script subtag matter; a region is ignored, except that Chinese
with region TW, HK or MO means Traditional script (``zh-TW`` -> ``zho_Hant``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.common.errors import InvalidArgument

# language, optional script, optional region, optional variants/extensions (ignored).
_BCP47 = re.compile(
    r"^(?P<lang>[A-Za-z]{2,3})(?:-(?P<script>[A-Za-z]{4}))?(?:-(?P<region>[A-Za-z]{2}|[0-9]{3}))?"
    r"(?:-[A-Za-z0-9]{1,8})*$"
)
_TRADITIONAL_REGIONS = frozenset({"TW", "HK", "MO"})

# ISO 639-1 (the BCP-47 primary subtag where one exists) -> the FLORES-200 code NLLB-200 uses for it.
# Macrolanguages map to the variety NLLB covers (ar -> arb, fa -> pes, ms -> zsm, sw -> swh, ...).
FLORES200 = {
    "af": "afr_Latn", "ak": "aka_Latn", "am": "amh_Ethi", "ar": "arb_Arab", "as": "asm_Beng",
    "ay": "ayr_Latn", "az": "azj_Latn", "ba": "bak_Cyrl", "be": "bel_Cyrl", "bg": "bul_Cyrl",
    "bm": "bam_Latn", "bn": "ben_Beng", "bo": "bod_Tibt", "bs": "bos_Latn", "ca": "cat_Latn",
    "cs": "ces_Latn", "cy": "cym_Latn", "da": "dan_Latn", "de": "deu_Latn", "dz": "dzo_Tibt",
    "ee": "ewe_Latn", "el": "ell_Grek", "en": "eng_Latn", "eo": "epo_Latn", "es": "spa_Latn",
    "et": "est_Latn", "eu": "eus_Latn", "fa": "pes_Arab", "ff": "fuv_Latn", "fi": "fin_Latn",
    "fj": "fij_Latn", "fo": "fao_Latn", "fr": "fra_Latn", "ga": "gle_Latn", "gd": "gla_Latn",
    "gl": "glg_Latn", "gn": "grn_Latn", "gu": "guj_Gujr", "ha": "hau_Latn", "he": "heb_Hebr",
    "hi": "hin_Deva", "hr": "hrv_Latn", "ht": "hat_Latn", "hu": "hun_Latn", "hy": "hye_Armn",
    "id": "ind_Latn", "ig": "ibo_Latn", "is": "isl_Latn", "it": "ita_Latn", "ja": "jpn_Jpan",
    "jv": "jav_Latn", "ka": "kat_Geor", "kg": "kon_Latn", "ki": "kik_Latn", "kk": "kaz_Cyrl",
    "km": "khm_Khmr", "kn": "kan_Knda", "ko": "kor_Hang", "ks": "kas_Arab", "ku": "kmr_Latn",
    "ky": "kir_Cyrl", "lb": "ltz_Latn", "lg": "lug_Latn", "li": "lim_Latn", "ln": "lin_Latn",
    "lo": "lao_Laoo", "lt": "lit_Latn", "lv": "lvs_Latn", "mg": "plt_Latn", "mi": "mri_Latn",
    "mk": "mkd_Cyrl", "ml": "mal_Mlym", "mn": "khk_Cyrl", "mr": "mar_Deva", "ms": "zsm_Latn",
    "mt": "mlt_Latn", "my": "mya_Mymr", "nb": "nob_Latn", "ne": "npi_Deva", "nl": "nld_Latn",
    "nn": "nno_Latn", "ny": "nya_Latn", "oc": "oci_Latn", "om": "gaz_Latn", "or": "ory_Orya",
    "pa": "pan_Guru", "pl": "pol_Latn", "ps": "pbt_Arab", "pt": "por_Latn", "qu": "quy_Latn",
    "rn": "run_Latn", "ro": "ron_Latn", "ru": "rus_Cyrl", "rw": "kin_Latn", "sa": "san_Deva",
    "sc": "srd_Latn", "sd": "snd_Arab", "sg": "sag_Latn", "si": "sin_Sinh", "sk": "slk_Latn",
    "sl": "slv_Latn", "sm": "smo_Latn", "sn": "sna_Latn", "so": "som_Latn", "sq": "als_Latn",
    "sr": "srp_Cyrl", "ss": "ssw_Latn", "st": "sot_Latn", "su": "sun_Latn", "sv": "swe_Latn",
    "sw": "swh_Latn", "ta": "tam_Taml", "te": "tel_Telu", "tg": "tgk_Cyrl", "th": "tha_Thai",
    "ti": "tir_Ethi", "tk": "tuk_Latn", "tl": "tgl_Latn", "tn": "tsn_Latn", "tr": "tur_Latn",
    "ts": "tso_Latn", "tt": "tat_Cyrl", "tw": "twi_Latn", "ug": "uig_Arab", "uk": "ukr_Cyrl",
    "ur": "urd_Arab", "uz": "uzn_Latn", "vi": "vie_Latn", "wo": "wol_Latn", "xh": "xho_Latn",
    "yi": "ydd_Hebr", "yo": "yor_Latn", "zh": "zho_Hans", "zu": "zul_Latn",
}  # fmt: skip
_FLORES_TO_639_1 = {code.split("_")[0]: lang for lang, code in FLORES200.items()}
# "no" (Norwegian) is the macrolanguage; NLLB's Norwegian is Bokmål.
_ALIASES = {"no": "nb", "iw": "he", "in": "id", "ji": "yi"}

FLORES_TOKEN = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")
M2M100_TOKEN = re.compile(r"^__[a-z]{2,3}__$")


@dataclass(frozen=True)
class LanguageTag:
    """The parts of a BCP-47 tag that choose a model's language.

    Attributes:
        language: Primary language subtag, lower case, aliases resolved ("no" -> "nb").
        script: Script subtag in title case ("Hant"), or "" when the tag has none.
        region: Region subtag in upper case, or "".
    """

    language: str
    script: str = ""
    region: str = ""


def parse_tag(code: str, field: str) -> LanguageTag:
    """Parses a BCP-47 tag.

    Args:
        code: The tag as the caller sent it ("fr", "pt-BR", "zh-Hant").
        field: Request field name, for the error message.

    Raises:
        InvalidArgument: Empty, or not a BCP-47 tag (for example a model token like ``fra_Latn``).
    """
    if not code.strip():
        raise InvalidArgument(f"{field} is empty: give a BCP-47 language code such as 'en' or 'fr'")
    match = _BCP47.match(code.strip())
    if match is None:
        raise InvalidArgument(
            f"{field} {code!r} is not a BCP-47 language code: use a code such as 'en', 'fr' or 'zh-Hant'"
        )
    language = match["lang"].lower()
    return LanguageTag(
        language=_ALIASES.get(language, language),
        script=(match["script"] or "").title(),
        region=(match["region"] or "").upper(),
    )


def flores_token(tag: LanguageTag, vocabulary: frozenset[str]) -> str | None:
    """The FLORES-200 token of ``tag`` in ``vocabulary``, or ``None`` when the model lacks it."""
    if tag.language in FLORES200:
        iso3, default_script = FLORES200[tag.language].split("_")
    else:
        iso3, default_script = tag.language, ""
    script = tag.script
    if not script and tag.language == "zh" and tag.region in _TRADITIONAL_REGIONS:
        script = "Hant"
    if script or default_script:
        token = f"{iso3}_{script or default_script}"
        return token if token in vocabulary else None
    # A language without an ISO 639-1 code and no script given: only unambiguous if the model has one script.
    candidates = sorted(t for t in vocabulary if t.startswith(iso3 + "_") and FLORES_TOKEN.match(t))
    return candidates[0] if len(candidates) == 1 else None


def flores_tags(tokens: list[str]) -> dict[str, str]:
    """BCP-47 tag for each FLORES-200 token, the inverse of :func:`flores_token`.

    ``fra_Latn`` -> ``fr``; a script other than the language's usual one is kept (``zho_Hant`` ->
    ``zh-Hant``); a language without an ISO 639-1 code keeps its ISO 639-3 code, plus the script when the
    model has the language in several scripts (``ace_Arab`` -> ``ace-Arab``).
    """
    by_iso3: dict[str, list[str]] = {}
    for token in tokens:
        by_iso3.setdefault(token.split("_")[0], []).append(token)
    tags = {}
    for token in tokens:
        iso3, script = token.split("_")
        lang = _FLORES_TO_639_1.get(iso3)
        if lang is not None:
            tags[token] = lang if FLORES200[lang] == token else f"{lang}-{script}"
        else:
            tags[token] = iso3 if len(by_iso3[iso3]) == 1 else f"{iso3}-{script}"
    return tags


def m2m100_token(tag: LanguageTag) -> str:
    """The M2M100 token of ``tag`` (script and region ignored)."""
    return f"__{tag.language}__"
