include $(sort $(wildcard $(BR2_EXTERNAL_OUTRIGGER_PATH)/package/*/*.mk))
