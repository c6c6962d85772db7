from neurosim.errors import UserError, DataError
