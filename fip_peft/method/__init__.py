"""The FIP tuner: what `FIPConfig(...)` and `get_peft_model` build. The config and its checks, the layer, the PEFT
model, the anchor memory and the passes over it, the metric gathered on a model, the sparsifier, the accuracy record
and the guard against plain fine-tuning. Modules here import `fip_peft.math` and each other, never the optimizers,
integrations or apps."""
