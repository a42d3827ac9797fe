"""The conditional LDM's own code (configs reach it as ``scripts.<module>.<name>``; run the bundle from its folder).

latent_autoencoder  stage 1: AutoencoderKL with KL / perceptual / adversarial losses, the latent scale factor, and
                    the bridge to stage 2 (latents of the frozen autoencoder)
latent_sampling     guided latent sampling per pathology x modality request, saving, montages, condition accuracy
request_sampling, training_preview, condition_sensitivity   runner glue, previews and a condition-sensitivity probe

The categorical condition tokens with classifier-free guidance are a shared layer: brainsynth.conditioning.categorical.
"""
