"""Parts of a tab kept in a file of their own: the latent experiments under the image tab, the
forward process under the generation tab. A section imports ``ui``'s shared modules, ``viz`` and
``sd_parts``, never a tab."""
