"""The demo: a tiny video DiT trained on procedural videos, its data, sampler and checkpoint,
video quality metrics, small diffusers models for `scalingattn inspect`, and the body of
`scalingattn demo`. Not needed to use the backend; installed because the README's first
command runs it.

    video_dit          the tiny DiT (diffusers WanTransformer3DModel on pixels), load_pretrained()
    sampling           flow-matching Euler sampler with CFG, video strips and contact sheets
    synthetic_videos   procedural shape videos and their three-token prompts
    metrics            PSNR and SSIM of videos
    zoo                real diffusers DiT classes at small sizes with example inputs
    run                `scalingattn demo`
"""
