"""FIP inside the Hugging Face stack: registration as a PEFT type, `FIPTrainer`, safe saving, the model card and the
class labels saved with an adapter. Modules here import the method and the optimizers, never the apps."""
