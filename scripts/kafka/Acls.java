// The ACLs of the access-control tests, made with Kafka's own Admin
// client (`java -cp "<kafka libs>/*" Acls.java <bootstrap>`, the JDK's
// single-file launcher): topics under `telemetry.` for the SCRAM user
// oona-telemetry, and `control.` and `innovation.` for ANONYMOUS only
// (the PLAINTEXT listener's clients, which are super users anyway). With
// allow.everyone.if.no.acl.found=true every other resource stays open.
import java.util.List;
import java.util.Properties;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

public class Acls {
    static AclBinding allow(String principal, String prefix) {
        return new AclBinding(
            new ResourcePattern(ResourceType.TOPIC, prefix, PatternType.PREFIXED),
            new AccessControlEntry(principal, "*", AclOperation.ALL, AclPermissionType.ALLOW));
    }

    public static void main(String[] args) throws Exception {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        try (Admin admin = Admin.create(p)) {
            admin.createAcls(List.of(
                allow("User:oona-telemetry", "telemetry."),
                allow("User:ANONYMOUS", "control."),
                allow("User:ANONYMOUS", "innovation."))).all().get();
        }
        System.out.println("acls created");
    }
}
