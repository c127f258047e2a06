"""Denoising-loss training / fine-tuning with the memorization recipe (thin wrapper over
cfgbasin_jax.apps.finetune; the library is cfgbasin_jax.training). Examples:

  # the shipped toy model (pixel space, from scratch)
  python -m cfgbasin_jax.toy.data --out toy_data
  python scripts/finetune.py --data toy_data --model toy --output_dir runs/toy --end 8 --repeats 250 ...
  # Wen et al.'s recipe on a converted SD folder (accelerator)
  python scripts/finetune.py --data laion_subset --model converted/sd14 --output_dir runs/sd \
      --end 200 --repeats 200 --non_mem_ratio 3 --max_train_steps 20000 --learning_rate 1e-5
"""

from cfgbasin_jax.apps.finetune import main

if __name__ == "__main__":
    raise SystemExit(main())
