"""placeholder"""
def has_lora(model): return False
def merge_lora(model): return model
