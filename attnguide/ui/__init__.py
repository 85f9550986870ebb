"""``attnguide ui``: a local web page to compare guidance methods side by side, with S-CFG's masks.

One job per module: ``form`` checks what the page sends (no gradio, no model work), ``compare``
runs the methods through ``attnguide.generate`` and draws the results, ``layout`` builds the
gradio page, ``app`` is the ``attnguide ui`` command. Only ``layout`` and ``app`` (inside the
command) import gradio, so the rest of attnguide works without it.
"""
