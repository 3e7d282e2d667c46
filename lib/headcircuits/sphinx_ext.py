"""A Sphinx extension for the book (listed in ``_config.yml``): every page loads each script once.

sphinx-thebe adds its inline configuration (``const THEBE_JS_URL = ...``) after the HTML builder exists, so Sphinx
(7.4) registers it twice: once with the file name ``None`` and once, from its registry, with ``''``; the two do not
compare equal, and every page declared the same constant twice and threw a JavaScript error. The book does not use Thebe (no live code: nothing may load from the network), so
duplicates are dropped here, keeping the first of each script (same file, same inline body).
"""

from __future__ import annotations


def _dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for script in scripts:
        attributes = getattr(script, "attributes", {}) or {}
        key = (getattr(script, "filename", None) or "", attributes.get("body", ""))
        if key in seen:
            continue
        seen.add(key)
        kept.append(script)
    context["script_files"] = kept


def setup(app):
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
