"""The slice of the AWS Backup service model (`backup`, restJson1) this control plane serves,
as plain data: each operation's HTTP method, URI template and success status, its input
shape, where each input member travels (URI label, query string or JSON body), the
constraints on every value, and the output shape's name.

Why a copy instead of loading botocore: the server must not depend on an SDK at run time
(Debian's packages and the VM have none), and clients check little (botocore checks
`required` and `min`, nothing of enums, patterns or maxima), so the server is the one that
enforces them. A unit test compares this table with botocore's model so a drift is caught
(tests/controlplane/test_backupmodel.py); the shapes are named and spelled as there.

Shape keys: type, min, max, pattern, enum, required, sensitive, timestampFormat; a structure
has `members` (name -> {"shape", "location", "locationName", ...}, no location = the JSON
body), a list `member`, a map `key` and `value` (shape names).
"""

from __future__ import annotations

from typing import Any

SIGNING_NAME = "backup"
API_VERSION = "2018-11-15"

# The first path segment of every request URI of the `backup` service, the operations this
# table leaves out included: a request under one of them is meant for this service, so the
# wire answers it in restJson1's shape (404 UnknownOperationException), not aiohttp's text.
SERVICE_PREFIXES = (
    "account-settings", "audit", "backup", "backup-access-point", "backup-jobs",
    "backup-vaults", "copy-jobs", "global-settings", "indexes", "legal-holds",
    "logically-air-gapped-backup-vaults", "resources", "restore-access-backup-vaults",
    "restore-jobs", "restore-testing", "scan", "supported-resource-types", "tags",
    "tiering-configurations", "untag",
)

# Constraints this server adds where the model has none, kept apart so the copy above stays
# comparable with botocore's: IAM is not modelled here, so a role ARN is only checked to be
# one (an account, a role name), never resolved.
STRICTER: dict[str, dict[str, Any]] = {
    "IAMRoleArn": {
        "min": 20,
        "max": 2048,
        "pattern": r"^arn:(aws|aws-cn|aws-us-gov):iam::[0-9]{12}:role/[\w+=,.@/-]{1,576}$",
    },
}


def _op(method: str, uri: str, input_shape: str, output_shape: str | None,
        errors: list[str], status: int = 200) -> dict[str, Any]:
    return {"method": method, "uri": uri, "status": status, "input": input_shape,
            "output": output_shape, "errors": errors}


def _label(shape: str, name: str) -> dict[str, Any]:
    return {"shape": shape, "location": "uri", "locationName": name}


def _query(shape: str, name: str) -> dict[str, Any]:
    return {"shape": shape, "location": "querystring", "locationName": name}


def _body(shape: str, **extra: Any) -> dict[str, Any]:
    return {"shape": shape, **extra}


_AE, _DF, _IPV, _IR, _IRS, _LE, _MPV, _RNF, _SU = (
    "AlreadyExistsException",
    "DependencyFailureException",
    "InvalidParameterValueException",
    "InvalidRequestException",
    "InvalidResourceStateException",
    "LimitExceededException",
    "MissingParameterValueException",
    "ResourceNotFoundException",
    "ServiceUnavailableException",
)

# Operation -> method, URI template, success status, input and output shapes (output None:
# an empty body), the errors the model declares for it (in the model's order).
OPERATIONS: dict[str, dict[str, Any]] = {
    "CreateBackupVault": _op(
        "PUT",
        "/backup-vaults/{backupVaultName}",
        "CreateBackupVaultInput",
        "CreateBackupVaultOutput",
        [_IPV, _MPV, _SU, _LE, _AE],
    ),
    "DescribeBackupVault": _op(
        "GET",
        "/backup-vaults/{backupVaultName}",
        "DescribeBackupVaultInput",
        "DescribeBackupVaultOutput",
        [_RNF, _IPV, _MPV, _SU],
    ),
    "ListBackupVaults": _op(
        "GET",
        "/backup-vaults/",
        "ListBackupVaultsInput",
        "ListBackupVaultsOutput",
        [_RNF, _IPV, _MPV, _SU],
    ),
    "DeleteBackupVault": _op(
        "DELETE",
        "/backup-vaults/{backupVaultName}",
        "DeleteBackupVaultInput",
        None,
        [_RNF, _IPV, _MPV, _SU, _IR],
    ),
    "StartBackupJob": _op(
        "PUT",
        "/backup-jobs",
        "StartBackupJobInput",
        "StartBackupJobOutput",
        [_RNF, _IPV, _MPV, _IR, _SU, _LE],
    ),
    "DescribeBackupJob": _op(
        "GET",
        "/backup-jobs/{backupJobId}",
        "DescribeBackupJobInput",
        "DescribeBackupJobOutput",
        [_RNF, _IPV, _MPV, _SU, _DF],
    ),
    "ListBackupJobs": _op(
        "GET", "/backup-jobs/", "ListBackupJobsInput", "ListBackupJobsOutput", [_IPV, _SU]
    ),
    "StopBackupJob": _op(
        "POST",
        "/backup-jobs/{backupJobId}",
        "StopBackupJobInput",
        None,
        [_MPV, _RNF, _IPV, _IR, _SU],
    ),
    "ListRecoveryPointsByBackupVault": _op(
        "GET",
        "/backup-vaults/{backupVaultName}/recovery-points/",
        "ListRecoveryPointsByBackupVaultInput",
        "ListRecoveryPointsByBackupVaultOutput",
        [_RNF, _IPV, _MPV, _SU],
    ),
    "ListRecoveryPointsByResource": _op(
        "GET",
        "/resources/{resourceArn}/recovery-points/",
        "ListRecoveryPointsByResourceInput",
        "ListRecoveryPointsByResourceOutput",
        [_RNF, _IPV, _MPV, _SU],
    ),
    "DescribeRecoveryPoint": _op(
        "GET",
        "/backup-vaults/{backupVaultName}/recovery-points/{recoveryPointArn}",
        "DescribeRecoveryPointInput",
        "DescribeRecoveryPointOutput",
        [_RNF, _IPV, _MPV, _SU],
    ),
    "DeleteRecoveryPoint": _op(
        "DELETE",
        "/backup-vaults/{backupVaultName}/recovery-points/{recoveryPointArn}",
        "DeleteRecoveryPointInput",
        None,
        [_RNF, _IPV, _MPV, _IRS, _SU, _IR],
    ),
    "GetRecoveryPointRestoreMetadata": _op(
        "GET",
        "/backup-vaults/{backupVaultName}/recovery-points/{recoveryPointArn}/restore-metadata",
        "GetRecoveryPointRestoreMetadataInput",
        "GetRecoveryPointRestoreMetadataOutput",
        [_RNF, _IPV, _MPV, _SU],
    ),
    "ListProtectedResources": _op(
        "GET",
        "/resources/",
        "ListProtectedResourcesInput",
        "ListProtectedResourcesOutput",
        [_IPV, _SU],
    ),
    "DescribeProtectedResource": _op(
        "GET",
        "/resources/{resourceArn}",
        "DescribeProtectedResourceInput",
        "DescribeProtectedResourceOutput",
        [_MPV, _IPV, _SU, _RNF],
    ),
    "StartRestoreJob": _op(
        "PUT",
        "/restore-jobs",
        "StartRestoreJobInput",
        "StartRestoreJobOutput",
        [_RNF, _IPV, _MPV, _SU, _IR],
    ),
    "DescribeRestoreJob": _op(
        "GET",
        "/restore-jobs/{restoreJobId}",
        "DescribeRestoreJobInput",
        "DescribeRestoreJobOutput",
        [_RNF, _IPV, _MPV, _SU, _DF],
    ),
    "ListRestoreJobs": _op(
        "GET",
        "/restore-jobs/",
        "ListRestoreJobsInput",
        "ListRestoreJobsOutput",
        [_RNF, _IPV, _MPV, _SU],
    ),
    "UpdateRecoveryPointLifecycle": _op(
        "POST",
        "/backup-vaults/{backupVaultName}/recovery-points/{recoveryPointArn}",
        "UpdateRecoveryPointLifecycleInput",
        "UpdateRecoveryPointLifecycleOutput",
        [_RNF, _IPV, _IR, _MPV, _SU],
    ),
}

# Shape name -> constraints (the inputs and every shape they use).
SHAPES: dict[str, dict[str, Any]] = {
    "ARN": {"type": "string"},
    "AccountId": {"type": "string", "pattern": "^[0-9]{12}$"},
    "BackupJobState": {
        "type": "string",
        "enum": [
            "CREATED",
            "PENDING",
            "RUNNING",
            "ABORTING",
            "ABORTED",
            "COMPLETED",
            "FAILED",
            "EXPIRED",
            "PARTIAL",
        ],
    },
    "BackupOptionKey": {"type": "string", "pattern": "^[a-zA-Z0-9\\-\\_\\.]{1,50}$"},
    "BackupOptionValue": {"type": "string", "pattern": "^[a-zA-Z0-9\\-\\_\\.]{1,50}$"},
    "BackupOptions": {"type": "map", "key": "BackupOptionKey", "value": "BackupOptionValue"},
    "BackupVaultName": {"type": "string", "pattern": "^[a-zA-Z0-9\\-\\_]{2,50}$"},
    "Boolean": {"type": "boolean"},
    "CreateBackupVaultInput": {
        "type": "structure",
        "required": ["BackupVaultName"],
        "members": {
            "BackupVaultName": _label("BackupVaultName", "backupVaultName"),
            "BackupVaultTags": _body("Tags"),
            "EncryptionKeyArn": _body("ARN"),
            "CreatorRequestId": _body("string", idempotencyToken=True),
        },
    },
    "DeleteBackupVaultInput": {
        "type": "structure",
        "required": ["BackupVaultName"],
        "members": {"BackupVaultName": _label("string", "backupVaultName")},
    },
    "DeleteRecoveryPointInput": {
        "type": "structure",
        "required": ["BackupVaultName", "RecoveryPointArn"],
        "members": {
            "BackupVaultName": _label("BackupVaultName", "backupVaultName"),
            "RecoveryPointArn": _label("ARN", "recoveryPointArn"),
        },
    },
    "DescribeBackupJobInput": {
        "type": "structure",
        "required": ["BackupJobId"],
        "members": {"BackupJobId": _label("string", "backupJobId")},
    },
    "DescribeBackupVaultInput": {
        "type": "structure",
        "required": ["BackupVaultName"],
        "members": {
            "BackupVaultName": _label("string", "backupVaultName"),
            "BackupVaultAccountId": _query("string", "backupVaultAccountId"),
        },
    },
    "DescribeProtectedResourceInput": {
        "type": "structure",
        "required": ["ResourceArn"],
        "members": {"ResourceArn": _label("ARN", "resourceArn")},
    },
    "DescribeRecoveryPointInput": {
        "type": "structure",
        "required": ["BackupVaultName", "RecoveryPointArn"],
        "members": {
            "BackupVaultName": _label("BackupVaultName", "backupVaultName"),
            "RecoveryPointArn": _label("ARN", "recoveryPointArn"),
            "BackupVaultAccountId": _query("AccountId", "backupVaultAccountId"),
        },
    },
    "DescribeRestoreJobInput": {
        "type": "structure",
        "required": ["RestoreJobId"],
        "members": {"RestoreJobId": _label("RestoreJobId", "restoreJobId")},
    },
    "GetRecoveryPointRestoreMetadataInput": {
        "type": "structure",
        "required": ["BackupVaultName", "RecoveryPointArn"],
        "members": {
            "BackupVaultName": _label("BackupVaultName", "backupVaultName"),
            "RecoveryPointArn": _label("ARN", "recoveryPointArn"),
            "BackupVaultAccountId": _query("AccountId", "backupVaultAccountId"),
        },
    },
    "IAMRoleArn": {"type": "string"},
    "Index": {"type": "string", "enum": ["ENABLED", "DISABLED"]},
    "Lifecycle": {
        "type": "structure",
        "members": {
            "MoveToColdStorageAfterDays": _body("Long"),
            "DeleteAfterDays": _body("Long"),
            "OptInToArchiveForSupportedResources": _body("Boolean"),
            "DeleteAfterEvent": _body("LifecycleDeleteAfterEvent"),
        },
    },
    "LifecycleDeleteAfterEvent": {"type": "string", "enum": ["DELETE_AFTER_COPY"]},
    "ListBackupJobsInput": {
        "type": "structure",
        "members": {
            "NextToken": _query("string", "nextToken"),
            "MaxResults": _query("MaxResults", "maxResults"),
            "ByResourceArn": _query("ARN", "resourceArn"),
            "ByState": _query("BackupJobState", "state"),
            "ByBackupVaultName": _query("BackupVaultName", "backupVaultName"),
            "ByCreatedBefore": _query("timestamp", "createdBefore"),
            "ByCreatedAfter": _query("timestamp", "createdAfter"),
            "ByResourceType": _query("ResourceType", "resourceType"),
            "ByAccountId": _query("AccountId", "accountId"),
            "ByCompleteAfter": _query("timestamp", "completeAfter"),
            "ByCompleteBefore": _query("timestamp", "completeBefore"),
            "ByParentJobId": _query("string", "parentJobId"),
            "ByMessageCategory": _query("string", "messageCategory"),
        },
    },
    "ListBackupVaultsInput": {
        "type": "structure",
        "members": {
            "ByVaultType": _query("VaultType", "vaultType"),
            "ByShared": _query("boolean", "shared"),
            "NextToken": _query("string", "nextToken"),
            "MaxResults": _query("MaxResults", "maxResults"),
        },
    },
    "ListProtectedResourcesInput": {
        "type": "structure",
        "members": {
            "NextToken": _query("string", "nextToken"),
            "MaxResults": _query("MaxResults", "maxResults"),
        },
    },
    "ListRecoveryPointsByBackupVaultInput": {
        "type": "structure",
        "required": ["BackupVaultName"],
        "members": {
            "BackupVaultName": _label("BackupVaultName", "backupVaultName"),
            "BackupVaultAccountId": _query("AccountId", "backupVaultAccountId"),
            "NextToken": _query("string", "nextToken"),
            "MaxResults": _query("MaxResults", "maxResults"),
            "ByResourceArn": _query("ARN", "resourceArn"),
            "ByResourceType": _query("ResourceType", "resourceType"),
            "ByBackupPlanId": _query("string", "backupPlanId"),
            "ByCreatedBefore": _query("timestamp", "createdBefore"),
            "ByCreatedAfter": _query("timestamp", "createdAfter"),
            "ByParentRecoveryPointArn": _query("ARN", "parentRecoveryPointArn"),
        },
    },
    "ListRecoveryPointsByResourceInput": {
        "type": "structure",
        "required": ["ResourceArn"],
        "members": {
            "ResourceArn": _label("ARN", "resourceArn"),
            "NextToken": _query("string", "nextToken"),
            "MaxResults": _query("MaxResults", "maxResults"),
            "ManagedByAWSBackupOnly": _query("boolean", "managedByAWSBackupOnly"),
        },
    },
    "ListRestoreJobsInput": {
        "type": "structure",
        "members": {
            "NextToken": _query("string", "nextToken"),
            "MaxResults": _query("MaxResults", "maxResults"),
            "ByAccountId": _query("AccountId", "accountId"),
            "ByResourceType": _query("ResourceType", "resourceType"),
            "ByCreatedBefore": _query("timestamp", "createdBefore"),
            "ByCreatedAfter": _query("timestamp", "createdAfter"),
            "ByStatus": _query("RestoreJobStatus", "status"),
            "ByCompleteBefore": _query("timestamp", "completeBefore"),
            "ByCompleteAfter": _query("timestamp", "completeAfter"),
            "ByRestoreTestingPlanArn": _query("ARN", "restoreTestingPlanArn"),
            "ByParentJobId": _query("string", "parentJobId"),
        },
    },
    "Long": {"type": "long"},
    "MaxResults": {"type": "integer", "min": 1, "max": 1000},
    "Metadata": {"type": "map", "sensitive": True, "key": "MetadataKey", "value": "MetadataValue"},
    "MetadataKey": {"type": "string"},
    "MetadataValue": {"type": "string"},
    "ResourceType": {"type": "string", "pattern": "^[a-zA-Z0-9\\-\\_\\.]{1,50}$"},
    "RestoreJobId": {"type": "string"},
    "RestoreJobStatus": {
        "type": "string",
        "enum": ["PENDING", "RUNNING", "COMPLETED", "ABORTED", "FAILED"],
    },
    "StartBackupJobInput": {
        "type": "structure",
        "required": ["BackupVaultName", "ResourceArn", "IamRoleArn"],
        "members": {
            "BackupVaultName": _body("BackupVaultName"),
            "LogicallyAirGappedBackupVaultArn": _body("ARN"),
            "ResourceArn": _body("ARN"),
            "IamRoleArn": _body("IAMRoleArn"),
            "IdempotencyToken": _body("string", idempotencyToken=True),
            "StartWindowMinutes": _body("WindowMinutes"),
            "CompleteWindowMinutes": _body("WindowMinutes"),
            "Lifecycle": _body("Lifecycle"),
            "RecoveryPointTags": _body("Tags"),
            "BackupOptions": _body("BackupOptions"),
            "Index": _body("Index"),
        },
    },
    "StartRestoreJobInput": {
        "type": "structure",
        "required": ["RecoveryPointArn", "Metadata"],
        "members": {
            "RecoveryPointArn": _body("ARN"),
            "Metadata": _body("Metadata"),
            "IamRoleArn": _body("IAMRoleArn"),
            "IdempotencyToken": _body("string", idempotencyToken=True),
            "ResourceType": _body("ResourceType"),
            "CopySourceTagsToRestoredResource": _body("boolean"),
        },
    },
    "StopBackupJobInput": {
        "type": "structure",
        "required": ["BackupJobId"],
        "members": {"BackupJobId": _label("string", "backupJobId")},
    },
    "TagKey": {"type": "string"},
    "TagValue": {"type": "string"},
    "Tags": {"type": "map", "sensitive": True, "key": "TagKey", "value": "TagValue"},
    "UpdateRecoveryPointLifecycleInput": {
        "type": "structure",
        "required": ["BackupVaultName", "RecoveryPointArn"],
        "members": {
            "BackupVaultName": _label("BackupVaultName", "backupVaultName"),
            "RecoveryPointArn": _label("ARN", "recoveryPointArn"),
            "Lifecycle": _body("Lifecycle"),
        },
    },
    "VaultType": {
        "type": "string",
        "enum": [
            "BACKUP_VAULT",
            "LOGICALLY_AIR_GAPPED_BACKUP_VAULT",
            "RESTORE_ACCESS_BACKUP_VAULT",
        ],
    },
    "WindowMinutes": {"type": "long"},
    "boolean": {"type": "boolean"},
    "string": {"type": "string"},
    "timestamp": {"type": "timestamp"},
}

# Reads: the replay cache leaves them alone (protocol.py says why).
READ_ONLY = frozenset(op for op in OPERATIONS if op.startswith(("Describe", "List", "Get")))
