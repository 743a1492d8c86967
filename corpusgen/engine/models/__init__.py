"""Model families: one file each (config mapping, tensor names, layer math as pure functions),
looked up by ``family_of``."""
